// attnlab: fused CPU kernel for neighborhood attention, forward and backward (fp32).
//
// Built on first use by attnlab/ops/neighborhood/fused.py (g++ -O3 -march=native) and called through
// ctypes, which releases the GIL, so Python threads run calls side by side.
//
// Geometry. Tokens are (n0, n1, n2) row-major (1-D and 2-D inputs get leading axes of length 1).
// Along each axis a, the query at position p sees the keys lo_a[p] ..= hi_a[p] (dilation is
// handled by the caller, which reorders each dilated axis into group order so that every window
// is a contiguous range). A query sees the product of its per-axis ranges. lo/hi are
// non-decreasing in p.
//
// Work. A "key row" is a run of keys along the last axis at fixed (z, y). Queries are taken G
// at a time (a group): G along the last axis, or 2 x 2 over two query rows (GY = 2: short windows
// along the last axis, where two queries' keys fit one vector of 8). The group's keys are the key
// rows in the union of its queries' axis-0/1 ranges, and along the last axis the union a ..= b
// of their ranges, so that only about (window + G/GY - 1) keys per key row are computed. The
// exact per-query mask (columns, and with GY = 2 rows) is applied when the scores become
// probabilities.
//
//   scores   S[i][r][c] = q_i . k_(r, a+c)           G x (R x Wt), Wt = W rounded up to 8
//   softmax  P = exp(S * scale - m_i) inside the query's window, 0 outside; l_i = sum P
//   output   o_i = sum_(r,c) P[i][r][c] v_(r, a+c) / l_i,  lse_i = m_i + log l_i
// Backward (P read back from what the forward saved, or recomputed from lse; delta_i = dO_i . o_i
// computed here):
//   dP = dO_i . v,  dS = P (dP - delta_i),  dq_i = scale sum dS k,
//   dk += scale dS^T q,  dv += P^T dO
// (S in scaled units: P = exp(scale * q.k - lse).)
//
// The score products read K (and, backward, V) transposed: d x keys per key row, padded by 8 zero
// columns, so that 8 consecutive keys are one vector. Up to kBlock groups in each of up to
// kQueryRows query rows form a block that shares most of its key rows; short windows score 2
// queries at a time (sub-groups). Register tiles and the reasons for each layout choice are at
// the functions. All loops use GCC/Clang
// vector extensions (8 floats: AVX2 with -march=native; other targets get what the compiler
// makes of them). Work is split by the caller: heads (bh) and flat group ranges per call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <mutex>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8 __attribute__((vector_size(32)));

constexpr int PAD = 8;   // zero key columns after each transposed key row
// Register tiles (16 vector registers): G x tasks score accumulators plus the loaded key vectors,
// G x vectors accumulators of the weighted sum plus the loaded value vectors, and for the
// scatter (dk, dv) G x vectors of the group's rows plus the loaded target vectors.
template <int G> constexpr int kScoreTasks = G == 4 ? 3 : 4;
template <int G> constexpr int kHeadVectors = G == 4 ? 3 : 4;      // weighted sums and scatters alike

inline v8 load(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
// Keeps a loaded vector in a register: without it the compiler folds the load into every FMA
// that uses it, which makes the products load-bound.
#define KEEP(x) asm("" : "+x"(x))

inline v8 bcast(float x) { return v8{x, x, x, x, x, x, x, x}; }
inline float hsum(v8 x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

// exp(x) for x <= ~0, relative error ~2e-7; x < -87 gives 0.
inline v8 vexp(v8 x) {
    const v8 lo = bcast(-87.0f);
    i8 under = x < lo;
    x = x < lo ? lo : x;
    const v8 magic = bcast(12582912.0f);                       // 1.5 * 2^23: round to nearest
    v8 n = (x * bcast(1.44269504088896341f) + magic) - magic;
    v8 r = x - n * bcast(0.693359375f) + n * bcast(2.12194440e-4f);
    v8 p = bcast(1.0f / 720);
    p = p * r + bcast(1.0f / 120);
    p = p * r + bcast(1.0f / 24);
    p = p * r + bcast(1.0f / 6);
    p = p * r + bcast(0.5f);
    p = p * r + bcast(1.0f);
    p = p * r + bcast(1.0f);
    i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
    v8 y = p * (v8)bits;
    return under ? bcast(0.0f) : y;
}

struct Geometry {
    int n0, n1, n2, D, Dv;
    const int32_t *lo0, *hi0, *lo1, *hi1, *lo2, *hi2;
    float scale;
    int64_t N() const { return int64_t(n0) * n1 * n2; }
};

// dst[row][c][x] = src[row][x][c]; columns n2 .. n2 + PAD - 1 are zero.
void transpose_rows(const float* src, float* dst, int rows, int n2, int D) {
    const int width = n2 + PAD;
    for (int r = 0; r < rows; ++r) {
        const float* s = src + int64_t(r) * n2 * D;
        float* t = dst + int64_t(r) * D * width;
        for (int x0 = 0; x0 < n2; x0 += 16) {
            const int x1 = std::min(n2, x0 + 16);
            for (int c = 0; c < D; ++c)
                for (int x = x0; x < x1; ++x) t[int64_t(c) * width + x] = s[int64_t(x) * D + c];
        }
        for (int c = 0; c < D; ++c) std::memset(t + int64_t(c) * width + n2, 0, PAD * sizeof(float));
    }
}

// T tasks of 8 key columns each, G query rows: out[t][i * ostride + j] = sum_c x[i][c] * kt[t][c * kstride + j]
// Depth range c0 .. c1 - 1 only; ADD: add to out instead of overwriting it (later depth chunks).
template <int G, int T, bool ADD>
inline void scores_tile(const float* x, int D, int c0, int c1, const float* const* kt, int64_t kstride,
                        float* const* out, int ostride) {
    v8 acc[G][T];
    for (int i = 0; i < G; ++i)
        for (int t = 0; t < T; ++t) acc[i][t] = ADD ? load(out[t] + i * ostride) : bcast(0.0f);
    for (int c = c0; c < c1; ++c) {
        if constexpr (G <= 2) {       // few rows: broadcasts first, one key vector live at a time
            v8 b[G];
            for (int i = 0; i < G; ++i) b[i] = bcast(x[i * D + c]);
            for (int t = 0; t < T; ++t) {
                v8 kv = load(kt[t] + c * kstride);
                KEEP(kv);
                for (int i = 0; i < G; ++i) acc[i][t] += b[i] * kv;
            }
        } else {                      // many rows: key vectors first, one broadcast live at a time
            v8 kv[T];
            for (int t = 0; t < T; ++t) {
                kv[t] = load(kt[t] + c * kstride);
                KEEP(kv[t]);
            }
            for (int i = 0; i < G; ++i) {
                const v8 b = bcast(x[i * D + c]);
                for (int t = 0; t < T; ++t) acc[i][t] += b * kv[t];
            }
        }
    }
    for (int i = 0; i < G; ++i)
        for (int t = 0; t < T; ++t) store(out[t] + i * ostride, acc[i][t]);
}

// n <= T tasks: one full tile, or the remainder in tiles of 2 and 1.
template <int G, int T, bool ADD>
inline void scores_tiles(int n, const float* x, int D, int c0, int c1, const float* const* kt, int64_t kstride,
                         float* const* out, int ostride) {
    if (n == T) {
        scores_tile<G, T, ADD>(x, D, c0, c1, kt, kstride, out, ostride);
        return;
    }
    int j = 0;
    if (T > 2 && n >= 2) {
        scores_tile<G, 2, ADD>(x, D, c0, c1, kt, kstride, out, ostride);
        j = 2;
    }
    for (; j < n; ++j) scores_tile<G, 1, ADD>(x, D, c0, c1, kt + j, kstride, out + j, ostride);
}

// One group of G queries inside a block: its query rows, key rows, first key column, score width
// and buffer. Its scores may be computed SG queries at a time (a sub-group, SG dividing G), each
// sub-group over the union of its own windows only: with short windows (3-D, k = 7) two queries
// need one vector of 8 keys where four need two.
struct Group {
    const float* x;       // G rows of the queries (or of dO), row stride = the product's depth
    const int64_t* rows;  // its R key rows (flat z' * n1 + y'), z' outside, y' = ylo ..= yhi inside
    int R, ylo, yhi;      // key rows; their range along axis 1
    int xg, a, W, Wt;     // first query along the last axis, first key column, union width, score row width (>= W, multiple of 8)
    int sub_col[4];       // per sub-group: first key column, relative to a
    int sub_tasks[4];     // per sub-group: vectors of 8 keys per key row
    int64_t tok[4];       // per query: its token (flat index in the head), -1 for padding
    int c0[4], c1[4];     // per query: its key columns c0 ..= c1, relative to a
    int r0[4], r1[4];     // per query: its key rows along axis 1, r0 ..= r1 relative to ylo
    float* S;             // G x (R x Wt) scores, row stride R * Wt
};

// S[i][r * Wt + c] = x_i . key(rows[r], a + c) for every group of a block (XT: the transposed
// keys, row_stride floats per key row, kstride per channel), per sub-group of SG queries
// sub_tasks vectors of 8 columns per row (columns outside a sub-group's range are left unset:
// they are outside its queries' windows). The groups of a block share most of their key rows, so
// the loop runs over tiles of tasks outside and (sub-)groups inside: a tile's key vectors are
// then read from L1 by every group, instead of from L2 once per group.
template <int G, int SG>
void scores_block(const Group* groups, int ngroups, int D, const float* XT, int64_t row_stride, int64_t kstride) {
    constexpr int T = kScoreTasks<SG>, NS = G / SG;
    int most = 0;
    for (int b = 0; b < ngroups; ++b)
        for (int u = 0; u < NS; ++u) most = std::max(most, groups[b].R * groups[b].sub_tasks[u]);
    const float* kt[T];
    float* out[T];
    // Two-query tiles (short windows) read their T key rows in depth chunks of 32, so that the
    // chunk stays in L1 while the block's groups reuse it (measured on 16 x 32 x 32, k = (3, 7, 7):
    // 15% faster; with four-query tiles, which read fewer rows, chunking was slower).
    const int chunk = SG == 2 ? 32 : D;
    for (int c0 = 0; c0 < D; c0 += chunk) {
        const int c1 = std::min(D, c0 + chunk);
        for (int t = 0; t < most; t += T) {
            for (int b = 0; b < ngroups; ++b) {
                const Group& grp = groups[b];
                const int ostride = grp.R * grp.Wt;
                for (int u = 0; u < NS; ++u) {
                    const int per_row = grp.sub_tasks[u], tasks = grp.R * per_row, n = std::min(T, tasks - t);
                    if (n <= 0) continue;
                    const int first = grp.a + grp.sub_col[u];
                    for (int j = 0; j < n; ++j) {
                        const int r = (t + j) / per_row, col = 8 * ((t + j) % per_row);
                        kt[j] = XT + grp.rows[r] * row_stride + first + col;
                        out[j] = grp.S + u * SG * ostride + r * grp.Wt + grp.sub_col[u] + col;
                    }
                    const float* x = grp.x + u * SG * D;
                    if (c0 == 0)
                        scores_tiles<SG, T, false>(n, x, D, c0, c1, kt, kstride, out, ostride);
                    else
                        scores_tiles<SG, T, true>(n, x, D, c0, c1, kt, kstride, out, ostride);
                }
            }
        }
    }
}

// acc_out[i][:] (G x Dx, row stride Dx) += sum_(r, c < W) P[i * pstride + r * Wt + c] * X[r][c][:],
// X[r] = rows[r] (row-major keys x Dx, already offset to the group's first key).
template <int G, int NV>
inline void weighted_block(const float* P, int pstride, int R, int Wt, int W, const float* const* rows, int Dx,
                           int d0, float* acc_out) {
    v8 acc[G][NV];
    for (int i = 0; i < G; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] = load(acc_out + i * Dx + d0 + 8 * j);
    if (R > 0 && W > 0) {
        // do-while loops (they run at least once): with for loops, which may run zero times, GCC
        // kept the accumulators in memory-backed form, with a flag store per accumulator per key
        int r = 0;
        do {
            const float* xr = rows[r] + d0;
            const float* pr = P + r * Wt;
            int c = 0;
            do {
                v8 xv[NV];
                for (int j = 0; j < NV; ++j) {
                    xv[j] = load(xr + 8 * j);
                    KEEP(xv[j]);
                }
                xr += Dx;
                for (int i = 0; i < G; ++i) {
                    const v8 b = bcast(pr[i * pstride + c]);
                    for (int j = 0; j < NV; ++j) acc[i][j] += b * xv[j];
                }
            } while (++c < W);
        } while (++r < R);
    }
    for (int i = 0; i < G; ++i)
        for (int j = 0; j < NV; ++j) store(acc_out + i * Dx + d0 + 8 * j, acc[i][j]);
}

// Vectors of 8 per register tile along the head dim: NV while that leaves no lone vector, then 2,
// then 1 (64 = 24 + 24 + 16: a one-vector tile runs at about half the speed of the others).
template <int NV>
inline int tile_vectors(int left) { return left >= NV && left - NV != 1 ? NV : left >= 2 ? 2 : 1; }

template <int G>
void weighted(const float* P, int pstride, int R, int Wt, int W, const float* const* rows, int Dx, float* acc_out) {
    constexpr int NV = kHeadVectors<G>;
    for (int d0 = 0; d0 < Dx;) {
        const int nv = tile_vectors<NV>((Dx - d0) / 8);
        if (nv == NV) weighted_block<G, NV>(P, pstride, R, Wt, W, rows, Dx, d0, acc_out);
        else if (nv == 2) weighted_block<G, 2>(P, pstride, R, Wt, W, rows, Dx, d0, acc_out);
        else weighted_block<G, 1>(P, pstride, R, Wt, W, rows, Dx, d0, acc_out);
        d0 += 8 * nv;
    }
}

// target[r][c][:] += alpha * sum_i P[i * pstride + r * Wt + c] * X[i][:]   (X: G x Dx local rows)
template <int G, int NV>
inline void scatter_block(const float* P, int pstride, int R, int Wt, int W, const float* X, int Dx, float alpha,
                          float* const* rows, int d0) {
    v8 xr[G][NV];
    for (int i = 0; i < G; ++i)
        for (int j = 0; j < NV; ++j) xr[i][j] = load(X + i * Dx + d0 + 8 * j) * bcast(alpha);
    if (R <= 0 || W <= 0) return;
    int r = 0;
    do {      // do-while, as in weighted_block
        float* t = rows[r] + d0;
        const float* pr = P + r * Wt;
        int c = 0;
        do {
            v8 acc[NV];
            for (int j = 0; j < NV; ++j) acc[j] = load(t + 8 * j);
            for (int i = 0; i < G; ++i) {
                const v8 b = bcast(pr[i * pstride + c]);
                for (int j = 0; j < NV; ++j) acc[j] += b * xr[i][j];
            }
            for (int j = 0; j < NV; ++j) store(t + 8 * j, acc[j]);
            t += Dx;
        } while (++c < W);
    } while (++r < R);
}

template <int G>
void scatter(const float* P, int pstride, int R, int Wt, int W, const float* X, int Dx, float alpha,
             float* const* rows) {
    constexpr int NV = kHeadVectors<G>;
    for (int d0 = 0; d0 < Dx;) {
        const int nv = tile_vectors<NV>((Dx - d0) / 8);
        if (nv == NV) scatter_block<G, NV>(P, pstride, R, Wt, W, X, Dx, alpha, rows, d0);
        else if (nv == 2) scatter_block<G, 2>(P, pstride, R, Wt, W, X, Dx, alpha, rows, d0);
        else scatter_block<G, 1>(P, pstride, R, Wt, W, X, Dx, alpha, rows, d0);
        d0 += 8 * nv;
    }
}

// Blocks: up to kBlock consecutive groups in each of up to kQueryRows consecutive group rows
// (z, y ..), which share most of their key rows (a query row's 21 key rows for k = (3, 7, 7), 24
// for two). The backward products over key rows run kRowChunk key rows (along axis 1) at a time
// for all the block's groups, so that those rows' keys and gradients stay in cache while every
// group that needs them uses them. (Both are macros only for tuning, through ATTNLAB_NA_CFLAGS.)
#ifndef ATTNLAB_NA_QUERY_ROWS
#define ATTNLAB_NA_QUERY_ROWS 2
#endif
#ifndef ATTNLAB_NA_ROW_CHUNK
#define ATTNLAB_NA_ROW_CHUNK 3
#endif
constexpr int kBlock = 8;
constexpr int kQueryRows = ATTNLAB_NA_QUERY_ROWS;
constexpr int kRowChunk = ATTNLAB_NA_ROW_CHUNK;
// The forward pass's weighted sums take all key rows of a z' at once (one row at a time measured
// slower there: it has one product, not three, to keep rows in cache for).
constexpr int kForwardRowChunk = 1 << 20;
constexpr int kBlockGroups = kBlock * kQueryRows;

// The key rows (flat z' * n1 + y') of the queries in rows y0 ..= y1 at z: z' outside, y' from
// lo1[y0] to hi1[y1] inside.
int key_rows(const Geometry& geo, int z, int y0, int y1, int64_t* out) {
    int R = 0;
    for (int zz = geo.lo0[z]; zz <= geo.hi0[z]; ++zz)
        for (int yy = geo.lo1[y0]; yy <= geo.hi1[y1]; ++yy) out[R++] = int64_t(zz) * geo.n1 + yy;
    return R;
}

// Columns of a group whose queries along the last axis are xg .. xg + GX - 1, scored SG at a time
// (SG >= GX: all together): first key column, union width, the sub-groups' ranges, and a row
// width that holds every sub-group's vectors.
inline void place(const Geometry& geo, int xg, int GX, int SG, int G, Group& grp) {
    const int gx = std::min(GX, geo.n2 - xg);
    grp.a = geo.lo2[xg];
    grp.W = geo.hi2[xg + gx - 1] - grp.a + 1;
    grp.Wt = (grp.W + 7) / 8 * 8;
    for (int u = 0; u < G / SG; ++u) {
        const int first = std::min(xg + u * SG, xg + gx - 1), last = std::min(xg + u * SG + SG, xg + gx) - 1;
        grp.sub_col[u] = geo.lo2[first] - grp.a;
        grp.sub_tasks[u] = (geo.hi2[last] - geo.lo2[first] + 1 + 7) / 8;
        grp.Wt = std::max(grp.Wt, (grp.sub_col[u] + 8 * grp.sub_tasks[u] + 7) / 8 * 8);
    }
}

// The most key rows of any group, the widest score row of any group (workspace sizes), and the
// most columns any sub-group scores per key row (the saved probabilities' row width). Groups
// span GY query rows and G / GY queries along the last axis.
void extents(const Geometry& geo, int G, int GY, int SG, int64_t& rows, int64_t& width, int64_t& sub_width) {
    rows = width = sub_width = 0;
    for (int z = 0; z < geo.n0; ++z)
        for (int y = 0; y < geo.n1; y += GY) {
            const int y1 = std::min(y + GY, geo.n1) - 1;
            rows = std::max<int64_t>(rows, int64_t(geo.hi0[z] - geo.lo0[z] + 1) * (geo.hi1[y1] - geo.lo1[y] + 1));
        }
    Group grp;
    for (int x = 0; x < geo.n2; x += G / GY) {
        place(geo, x, G / GY, SG, G, grp);
        width = std::max<int64_t>(width, grp.Wt);
        for (int u = 0; u < G / SG; ++u) sub_width = std::max<int64_t>(sub_width, 8 * grp.sub_tasks[u]);
    }
}

// Per-thread scratch that survives calls (growing only), so that repeated calls do not pay for
// fresh pages; released when a call needed more than kKeepBytes.
constexpr size_t kKeepBytes = size_t(64) << 20;

struct Scratch {
    float* data = nullptr;
    size_t size = 0, used = 0;     // in floats
    ~Scratch() { std::free(data); }
    float* take(size_t n) {        // n floats, 32-byte aligned
        n = (n + 7) / 8 * 8;
        float* p = data + used;
        used += n;
        return p;
    }
};

thread_local Scratch scratch;

// Reserves `total` floats of per-thread scratch (the sum of the rounded-up requests). Backed
// by 2 MiB pages where the kernel allows it: the transposed keys of a long 1-D sequence are
// read d rows apart, one 4 KiB page per row otherwise, and TLB misses then cost ~25%.
void reserve_scratch(size_t total) {
    scratch.used = 0;
    if (scratch.size >= total) return;
    std::free(scratch.data);
    scratch.data = nullptr;
    scratch.size = 0;
    constexpr size_t huge = size_t(2) << 20;
    const size_t bytes = (total * sizeof(float) + huge - 1) / huge * huge;
    void* p = nullptr;
    if (posix_memalign(&p, huge, bytes)) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);
#endif
    scratch.data = static_cast<float*>(p);
    scratch.size = bytes / sizeof(float);
}

void release_scratch() {
    if (scratch.size * sizeof(float) > kKeepBytes) {
        std::free(scratch.data);
        scratch.data = nullptr;
        scratch.size = 0;
    }
}

inline size_t rounded(int64_t n) { return size_t((n + 7) / 8 * 8); }

// The G rows (width D) of a group's queries in src (one head, token-major): src itself where they
// are consecutive tokens, else gathered into dst with zero rows for padding.
template <int G>
inline const float* group_rows(const Group& grp, const float* src, int D, float* dst) {
    bool consecutive = grp.tok[0] >= 0;
    for (int i = 1; i < G; ++i) consecutive = consecutive && grp.tok[i] == grp.tok[0] + i;
    if (consecutive) return src + grp.tok[0] * D;
    for (int i = 0; i < G; ++i) {
        if (grp.tok[i] >= 0) std::memcpy(dst + i * D, src + grp.tok[i] * D, sizeof(float) * D);
        else std::memset(dst + i * D, 0, sizeof(float) * D);
    }
    return dst;
}

// Calls fn(z, y, rows, xg0, count) for the blocks of groups group0 .. group1 - 1 (row-major over
// (n0, ceil(n1 / GY), groups per row); a group spans GY query rows and GX queries along the last
// axis): `rows` group rows from query row y on (whole ones at one z, where the range holds
// them), at most kBlock groups in each from xg0 on.
template <typename Fn>
void for_blocks(const Geometry& geo, int GX, int GY, int64_t group0, int64_t group1, Fn fn) {
    const int64_t per_row = (geo.n2 + GX - 1) / GX, rows_per_z = (geo.n1 + GY - 1) / GY;
    for (int64_t flat = group0; flat < group1;) {
        const int64_t row = flat / per_row, first = flat % per_row;
        const int z = int(row / rows_per_z), Y = int(row % rows_per_z);
        const int64_t whole = first == 0 ? std::min<int64_t>({kQueryRows, rows_per_z - Y, (group1 - flat) / per_row}) : 0;
        if (whole > 0) {
            for (int64_t x = 0; x < per_row; x += kBlock)
                fn(z, Y * GY, int(whole), int(x) * GX, int(std::min<int64_t>(kBlock, per_row - x)));
            flat += whole * per_row;
            continue;
        }
        const int count = int(std::min<int64_t>({kBlock, per_row - first, group1 - flat}));
        fn(z, Y * GY, 1, int(first) * GX, count);
        flat += count;
    }
}

// The groups of block (z, group rows from query row y on, nrows of them, groups from xg0 on, count
// per row): rows[] holds each group row's key rows (most_rows apart), x the G rows of `src`
// (depth D) of each group (pad: scratch for gathered rows), S their score buffers (G * SW floats
// apart). Query i of a group sits at row i / GX, column i % GX of the group (GX = G / GY).
template <int G, int GY, int SG>
int setup_block(const Geometry& geo, int z, int y, int nrows, int xg0, int count, const float* src, int D,
                int64_t* rows, int64_t most_rows, float* pad, float* S, int64_t SW, Group* groups) {
    constexpr int GX = G / GY;
    int n = 0;
    for (int i = 0; i < nrows; ++i) {
        int64_t* own = rows + i * most_rows;
        const int y0 = y + i * GY, y1 = std::min(y0 + GY, geo.n1) - 1;
        const int R = key_rows(geo, z, y0, y1, own);
        for (int b = 0; b < count; ++b, ++n) {
            Group& grp = groups[n];
            grp.xg = xg0 + b * GX;
            place(geo, grp.xg, GX, SG, G, grp);
            grp.rows = own;
            grp.R = R;
            grp.ylo = geo.lo1[y0];
            grp.yhi = geo.hi1[y1];
            for (int q = 0; q < G; ++q) {
                const int yq = y0 + q / GX, xq = grp.xg + q % GX;
                const bool valid = yq <= y1 && xq < geo.n2;
                const int ys = valid ? yq : y0, xs = valid ? xq : grp.xg;
                grp.tok[q] = valid ? (int64_t(z) * geo.n1 + yq) * geo.n2 + xq : -1;
                grp.c0[q] = geo.lo2[xs] - grp.a;
                grp.c1[q] = geo.hi2[xs] - grp.a;
                grp.r0[q] = geo.lo1[ys] - grp.ylo;
                grp.r1[q] = geo.hi1[ys] - grp.ylo;
            }
            grp.x = group_rows<G>(grp, src, D, pad + n * G * D);
            grp.S = S + n * G * SW;
        }
    }
    return n;
}

// Calls fn(b, r0, rc) for group b's key rows r0 .. r0 + rc - 1, `chunk` rows of axis 1 at a time
// for all groups of a block (at z) before the next chunk: group b's rows are z' outside, y' in
// ylo ..= yhi inside.
template <typename Fn>
void for_row_chunks(const Geometry& geo, int z, const Group* groups, int ngroups, int chunk, Fn fn) {
    const int nz = geo.hi0[z] - geo.lo0[z] + 1, first = groups[0].ylo, last = groups[ngroups - 1].yhi;
    for (int zi = 0; zi < nz; ++zi)
        for (int c0 = first; c0 <= last; c0 += chunk) {
            const int c1 = std::min(last + 1, c0 + chunk);
            for (int b = 0; b < ngroups; ++b) {
                const int lo = groups[b].ylo, hi = groups[b].yhi;
                const int s = std::max(c0, lo), e = std::min(c1, hi + 1);
                if (e > s) fn(b, zi * (hi - lo + 1) + s - lo, e - s);
            }
        }
}

// Lane masks of the columns inside [c0, c1] for a score row of Wt columns (Wt / 8 vectors).
inline void window_masks(int c0, int c1, int Wt, i8* masks) {
    const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int j = 0; j < Wt / 8; ++j) {
        const i8 col = lane + 8 * j;
        masks[j] = (col >= c0) & (col <= c1);
    }
}

// Softmax of one query's scores in place (R rows of Wt columns): probabilities inside its window,
// columns c0 ..= c1 (masks from window_masks) of the rows r with r0 <= r % per_z <= r1, exactly 0
// elsewhere. Vectors wholly outside the
// window are only zeroed (with short windows, half of them). Returns the scaled row maximum;
// *sum gets the sum of the probabilities.
inline float softmax_row(const Geometry& geo, int R, int Wt, int c0, int c1, int per_z, int r0, int r1,
                         const i8* masks, float* Si, float* sum) {
    const int nv = Wt / 8, j0 = c0 / 8, j1 = c1 / 8;
    v8 vmax = bcast(-INFINITY);
    for (int r = 0; r < R; ++r) {
        if (r % per_z < r0 || r % per_z > r1) continue;
        for (int j = j0; j <= j1; ++j) {
            const v8 x = load(Si + r * Wt + 8 * j);
            vmax = masks[j] && x > vmax ? x : vmax;
        }
    }
    float m = vmax[0];
    for (int l = 1; l < 8; ++l) m = std::max(m, vmax[l]);
    m *= geo.scale;
    const v8 sc = bcast(geo.scale), mv = bcast(m), zero = bcast(0.0f);
    v8 lsum = zero;
    for (int r = 0; r < R; ++r) {
        float* row = Si + r * Wt;
        if (r % per_z < r0 || r % per_z > r1) {
            for (int j = 0; j < nv; ++j) store(row + 8 * j, zero);
            continue;
        }
        for (int j = 0; j < j0; ++j) store(row + 8 * j, zero);
        for (int j = j0; j <= j1; ++j) {
            const v8 e = masks[j] ? vexp(load(row + 8 * j) * sc - mv) : zero;
            store(row + 8 * j, e);
            lsum += e;
        }
        for (int j = j1 + 1; j < nv; ++j) store(row + 8 * j, zero);
    }
    *sum = hsum(lsum);
    return m;
}

// Saved probabilities: per query, its R key rows x sub_width columns, from its sub-group's first
// column on (the columns its score tiles compute; exact zeros outside its window), `stride`
// floats per query. save: S row block -> saved; restore: saved -> S rows (other columns 0).
inline void save_probs(const float* Si, int R, int Wt, int col, int cols, float scale_by, float* saved) {
    const v8 f = bcast(scale_by);
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < cols; c += 8) store(saved + r * cols + c, load(Si + r * Wt + col + c) * f);
}

inline void restore_probs(const float* saved, int R, int Wt, int col, int cols, float* Si) {
    for (int r = 0; r < R; ++r) {
        std::memset(Si + r * Wt, 0, sizeof(float) * Wt);
        for (int c = 0; c < cols; c += 8) store(Si + r * Wt + col + c, load(saved + r * cols + c));
    }
}

template <int G, int GY, int SG>
int forward_impl(const float* q, const float* k, const float* v, float* out, float* lse, float* probs,
                 int64_t probs_stride, int64_t bh0, int64_t bh1, int64_t group0, int64_t group1, const Geometry& geo) {
    const int D = geo.D, Dv = geo.Dv, n2 = geo.n2;
    const int64_t N = geo.N(), rows = int64_t(geo.n0) * geo.n1, width = n2 + PAD;
    int64_t most_rows, most_width, sub_width;
    extents(geo, G, GY, SG, most_rows, most_width, sub_width);
    const int64_t SW = most_rows * most_width;
    reserve_scratch(rounded(rows * D * width) + kBlockGroups * (rounded(G * SW) + rounded(G * Dv) + rounded(G * D)));
    float* KT = scratch.take(rows * D * width);
    float* S = scratch.take(kBlockGroups * G * SW);
    float* O = scratch.take(kBlockGroups * G * Dv);
    float* Qpad = scratch.take(kBlockGroups * G * D);
    std::vector<int64_t> krows(kQueryRows * most_rows);
    std::vector<const float*> vrow(most_rows);
    Group groups[kBlockGroups];
    std::vector<i8> masks_buf(most_width / 8 + 1);
    i8* masks = masks_buf.data();
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const float* vb = v + bh * N * Dv;
        transpose_rows(k + bh * N * D, KT, int(rows), n2, D);
        for_blocks(geo, G / GY, GY, group0, group1, [&](int z, int y, int nrows, int x0, int count) {
            const int n = setup_block<G, GY, SG>(geo, z, y, nrows, x0, count, q + bh * N * D, D, krows.data(),
                                                 most_rows, Qpad, S, SW, groups);
            scores_block<G, SG>(groups, n, D, KT, D * width, width);
            float m_i[kBlockGroups][G], l_i[kBlockGroups][G];
            for (int b = 0; b < n; ++b) {
                const Group& grp = groups[b];
                const int ostride = grp.R * grp.Wt, per_z = grp.yhi - grp.ylo + 1;
                for (int i = 0; i < G; ++i) {
                    if (grp.tok[i] >= 0) {
                        window_masks(grp.c0[i], grp.c1[i], grp.Wt, masks);
                        m_i[b][i] = softmax_row(geo, grp.R, grp.Wt, grp.c0[i], grp.c1[i], per_z, grp.r0[i], grp.r1[i],
                                                masks, grp.S + i * ostride, &l_i[b][i]);
                    } else {
                        std::memset(grp.S + i * ostride, 0, sizeof(float) * ostride);
                    }
                }
            }
            std::memset(O, 0, sizeof(float) * n * G * Dv);
            for_row_chunks(geo, z, groups, n, kForwardRowChunk, [&](int b, int r0, int rc) {
                const Group& grp = groups[b];
                for (int r = 0; r < rc; ++r) vrow[r] = vb + (grp.rows[r0 + r] * n2 + grp.a) * Dv;
                weighted<G>(grp.S + r0 * grp.Wt, grp.R * grp.Wt, rc, grp.Wt, grp.W, vrow.data(), Dv, O + b * G * Dv);
            });
            for (int b = 0; b < n; ++b) {
                const Group& grp = groups[b];
                for (int i = 0; i < G; ++i) {
                    if (grp.tok[i] < 0) continue;
                    const int64_t t_i = bh * N + grp.tok[i];
                    const float inv = 1.0f / l_i[b][i];
                    const float* o = O + (b * G + i) * Dv;
                    float* t = out + t_i * Dv;
                    for (int c = 0; c < Dv; ++c) t[c] = o[c] * inv;
                    lse[t_i] = m_i[b][i] + std::log(l_i[b][i]);
                    if (probs) {
                        const int u = i / SG;
                        save_probs(grp.S + i * grp.R * grp.Wt, grp.R, grp.Wt, grp.sub_col[u], 8 * grp.sub_tasks[u],
                                   inv, probs + t_i * probs_stride);
                    }
                }
            }
        });
    }
    release_scratch();
    return 0;
}

template <int G, int GY, int SG>
int backward_impl(const float* q, const float* k, const float* v, const float* o, const float* dout,
                  const float* lse, const float* probs, int64_t probs_stride, bool zero_grads, float* dq, float* dk,
                  float* dv, int64_t bh0, int64_t bh1, int64_t group0, int64_t group1, const Geometry& geo) {
    const int D = geo.D, Dv = geo.Dv, n2 = geo.n2;
    const int64_t N = geo.N(), rows = int64_t(geo.n0) * geo.n1, width = n2 + PAD;
    int64_t most_rows, most_width, sub_width;
    extents(geo, G, GY, SG, most_rows, most_width, sub_width);
    const int64_t SW = most_rows * most_width;
    reserve_scratch(rounded(rows * D * width) + rounded(rows * Dv * width) +
                    kBlockGroups * (2 * rounded(G * SW) + 2 * rounded(G * D) + rounded(G * Dv)));
    float* KT = scratch.take(rows * D * width);
    float* VT = scratch.take(rows * Dv * width);
    float* P = scratch.take(kBlockGroups * G * SW);
    float* dS = scratch.take(kBlockGroups * G * SW);
    float* Qpad = scratch.take(kBlockGroups * G * D);
    float* Gpad = scratch.take(kBlockGroups * G * Dv);
    float* dQ = scratch.take(kBlockGroups * G * D);
    std::vector<int64_t> krows(kQueryRows * most_rows);
    std::vector<const float*> krow(most_rows);
    std::vector<float*> dkrow(most_rows), dvrow(most_rows);
    Group pg[kBlockGroups], dg[kBlockGroups];     // the same groups: P = Q K^T, then dP = dO V^T
    std::vector<i8> masks_buf(most_width / 8 + 1);
    i8* masks = masks_buf.data();
    for (int64_t bh = bh0; bh < bh1; ++bh) {
        const float* kb = k + bh * N * D;
        if (!probs) transpose_rows(kb, KT, int(rows), n2, D);     // with saved probabilities, q.k is not needed
        transpose_rows(v + bh * N * Dv, VT, int(rows), n2, Dv);
        if (zero_grads) {
            std::memset(dk + bh * N * D, 0, sizeof(float) * N * D);
            std::memset(dv + bh * N * Dv, 0, sizeof(float) * N * Dv);
        }
        for_blocks(geo, G / GY, GY, group0, group1, [&](int z, int y, int nrows, int x0, int count) {
            const int n = setup_block<G, GY, SG>(geo, z, y, nrows, x0, count, q + bh * N * D, D, krows.data(),
                                                 most_rows, Qpad, P, SW, pg);
            for (int b = 0; b < n; ++b) {
                dg[b] = pg[b];
                dg[b].x = group_rows<G>(pg[b], dout + bh * N * Dv, Dv, Gpad + b * G * Dv);
                dg[b].S = dS + b * G * SW;
            }
            if (!probs) scores_block<G, SG>(pg, n, D, KT, D * width, width);
            scores_block<G, SG>(dg, n, Dv, VT, Dv * width, width);
            for (int b = 0; b < n; ++b) {
                const Group& grp = pg[b];
                const int Wt = grp.Wt, ostride = grp.R * Wt, per_z = grp.yhi - grp.ylo + 1;
                for (int i = 0; i < G; ++i) {
                    float* Pi = grp.S + i * ostride;
                    float* dSi = dg[b].S + i * ostride;
                    if (grp.tok[i] < 0) {
                        std::memset(Pi, 0, sizeof(float) * ostride);
                        std::memset(dSi, 0, sizeof(float) * ostride);
                        continue;
                    }
                    const int64_t t_i = bh * N + grp.tok[i];
                    v8 dot = bcast(0.0f);                        // delta_i = dO_i . o_i
                    for (int c = 0; c < Dv; c += 8) dot += load(dg[b].x + i * Dv + c) * load(o + t_i * Dv + c);
                    const v8 l = bcast(lse[t_i]), dl = bcast(hsum(dot)), sc = bcast(geo.scale);
                    const int j0 = grp.c0[i] / 8, j1 = grp.c1[i] / 8;
                    window_masks(grp.c0[i], grp.c1[i], Wt, masks);
                    const v8 zero = bcast(0.0f);
                    if (probs) {
                        const int u = i / SG;
                        restore_probs(probs + t_i * probs_stride, grp.R, Wt, grp.sub_col[u], 8 * grp.sub_tasks[u], Pi);
                    }
                    for (int r = 0; r < grp.R; ++r) {  // outside the window P = dS = 0 (dP may be unset there)
                        const bool row_in = r % per_z >= grp.r0[i] && r % per_z <= grp.r1[i];
                        for (int j = 0; j < Wt / 8; ++j) {
                            float* Pr = Pi + r * Wt + 8 * j;
                            float* dSr = dSi + r * Wt + 8 * j;
                            if (!row_in || j < j0 || j > j1) {
                                store(Pr, zero);
                                store(dSr, zero);
                                continue;
                            }
                            const v8 p = !masks[j] ? zero : probs ? load(Pr) : vexp(load(Pr) * sc - l);
                            store(Pr, p);
                            store(dSr, masks[j] ? p * (load(dSr) - dl) : zero);
                        }
                    }
                }
            }
            std::memset(dQ, 0, sizeof(float) * n * G * D);
            for_row_chunks(geo, z, pg, n, kRowChunk, [&](int b, int r0, int rc) {
                const Group& grp = pg[b];
                const int Wt = grp.Wt, ostride = grp.R * Wt;
                for (int r = 0; r < rc; ++r) {
                    const int64_t kr = grp.rows[r0 + r] * n2 + grp.a;
                    krow[r] = kb + kr * D;
                    dkrow[r] = dk + (bh * N + kr) * D;
                    dvrow[r] = dv + (bh * N + kr) * Dv;
                }
                const float* dSb = dg[b].S + r0 * Wt;
                weighted<G>(dSb, ostride, rc, Wt, grp.W, krow.data(), D, dQ + b * G * D);
                scatter<G>(dSb, ostride, rc, Wt, grp.W, grp.x, D, geo.scale, dkrow.data());
                scatter<G>(grp.S + r0 * Wt, ostride, rc, Wt, grp.W, dg[b].x, Dv, 1.0f, dvrow.data());
            });
            for (int b = 0; b < n; ++b) {
                for (int i = 0; i < G; ++i) {
                    if (pg[b].tok[i] < 0) continue;
                    float* t = dq + (bh * N + pg[b].tok[i]) * D;
                    const float* s = dQ + (b * G + i) * D;
                    for (int c = 0; c < D; ++c) t[c] = s[c] * geo.scale;
                }
            }
        });
    }
    release_scratch();
    return 0;
}

bool make_geometry(const int32_t* dims, const int32_t* windows, float scale, Geometry& geo) {
    geo.n0 = dims[0];
    geo.n1 = dims[1];
    geo.n2 = dims[2];
    geo.D = dims[3];
    geo.Dv = dims[4];
    if (geo.n0 < 1 || geo.n1 < 1 || geo.n2 < 1 || geo.D < 8 || geo.Dv < 8 || geo.D % 8 || geo.Dv % 8) return false;
    geo.lo0 = windows;
    geo.hi0 = geo.lo0 + geo.n0;
    geo.lo1 = geo.hi0 + geo.n0;
    geo.hi1 = geo.lo1 + geo.n1;
    geo.lo2 = geo.hi1 + geo.n1;
    geo.hi2 = geo.lo2 + geo.n2;
    geo.scale = scale;
    return true;
}

// The compiled layouts: (queries per group, query rows per group, queries per score tile).
template <int G_, int GY_, int SG_>
struct Layout {
    static constexpr int G = G_, GY = GY_, SG = SG_;
};

// fn(Layout<...>()) for the compiled layout (group, group_rows, sub_group); 1 for any other.
template <typename Fn>
int with_layout(int group, int group_rows, int sub_group, Fn fn) {
    if (group == 2 && group_rows == 1 && sub_group == 2) return fn(Layout<2, 1, 2>());
    if (group == 4 && group_rows == 1 && sub_group == 2) return fn(Layout<4, 1, 2>());
    if (group == 4 && group_rows == 1 && sub_group == 4) return fn(Layout<4, 1, 4>());
    if (group == 4 && group_rows == 2 && sub_group == 4) return fn(Layout<4, 2, 4>());
    return 1;
}

// fn(geo) on the call's geometry; 1 for a bad geometry, 2 when memory ran out.
template <typename Fn>
int with_geometry(const int32_t* dims, const int32_t* windows, float scale, Fn fn) {
    Geometry geo;
    if (!make_geometry(dims, windows, scale, geo)) return 1;
    try {
        return fn(geo);
    } catch (const std::bad_alloc&) {
        return 2;
    }
}

// --- output tensors from a reusing pool, handed to torch through DLPack --------------------------
//
// torch allocates large tensors with mmap and returns them with munmap, so every fresh output
// page-faults once per 4 KiB page on its first write, and the kernel threads then queue on the
// process's memory-map lock: measured 10-20% of a forward+backward at 16k tokens x 8 heads.
// Outputs come from here instead: blocks freed by torch (through the DLPack deleter) are kept,
// up to kPoolBytes (512 MiB), and reused for the next output of the same size, already paged in.

struct DLDevice { int32_t device_type, device_id; };
struct DLDataType { uint8_t code, bits; uint16_t lanes; };
struct DLTensor {
    void* data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void* manager_ctx;
    void (*deleter)(DLManagedTensor*);
};

constexpr size_t kPoolBytes = size_t(512) << 20;
std::mutex pool_mutex;
std::vector<std::pair<size_t, void*>> pool_blocks;   // (bytes, block) kept for reuse
size_t pool_kept = 0;

#if defined(__unix__) || defined(__APPLE__)
// fork() while another thread holds pool_mutex would leave it locked forever in the child (its
// holder does not exist there): the forking thread takes it first and both sides release it.
struct ForkGuard {
    ForkGuard() {
        pthread_atfork([] { pool_mutex.lock(); }, [] { pool_mutex.unlock(); }, [] { pool_mutex.unlock(); });
    }
} fork_guard;
#endif

struct PooledTensor {
    DLManagedTensor managed;
    int64_t shape[8];
    size_t bytes;
};

void return_to_pool(DLManagedTensor* managed) {
    auto* owner = static_cast<PooledTensor*>(managed->manager_ctx);
    void* block = managed->dl_tensor.data;
    {
        std::lock_guard<std::mutex> lock(pool_mutex);
        if (pool_kept + owner->bytes <= kPoolBytes) {
            pool_blocks.emplace_back(owner->bytes, block);
            pool_kept += owner->bytes;
            block = nullptr;
        }
    }
    std::free(block);
    delete owner;
}

}  // namespace

extern "C" {

// A contiguous float32 CPU tensor of `ndim` (<= 8) dims as a DLManagedTensor (for a "dltensor"
// capsule), its memory from the pool; nullptr when out of memory.
void* attnlab_na_tensor(int ndim, const int64_t* shape) {
    if (ndim < 1 || ndim > 8) return nullptr;
    size_t count = 1;
    for (int i = 0; i < ndim; ++i) count *= size_t(shape[i]);
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(float);
    void* block = nullptr;
    {
        std::lock_guard<std::mutex> lock(pool_mutex);
        for (size_t i = 0; i < pool_blocks.size(); ++i)
            if (pool_blocks[i].first == bytes) {
                block = pool_blocks[i].second;
                pool_kept -= bytes;
                pool_blocks[i] = pool_blocks.back();
                pool_blocks.pop_back();
                break;
            }
    }
    if (!block && posix_memalign(&block, 64, bytes)) return nullptr;
    auto* owner = new (std::nothrow) PooledTensor();
    if (!owner) {
        std::free(block);
        return nullptr;
    }
    owner->bytes = bytes;
    for (int i = 0; i < ndim; ++i) owner->shape[i] = shape[i];
    DLTensor& t = owner->managed.dl_tensor;
    t.data = block;
    t.device = {1, 0};            // kDLCPU
    t.ndim = ndim;
    t.dtype = {2, 32, 1};         // kDLFloat, 32 bits, 1 lane
    t.shape = owner->shape;
    t.strides = nullptr;          // contiguous
    t.byte_offset = 0;
    owner->managed.manager_ctx = owner;
    owner->managed.deleter = return_to_pool;
    return &owner->managed;
}

// Frees the pool's kept blocks; returns the bytes released.
int64_t attnlab_na_pool_clear() {
    std::vector<std::pair<size_t, void*>> blocks;
    {
        std::lock_guard<std::mutex> lock(pool_mutex);
        blocks.swap(pool_blocks);
        pool_kept = 0;
    }
    int64_t released = 0;
    for (auto& b : blocks) {
        released += int64_t(b.first);
        std::free(b.second);
    }
    return released;
}

int attnlab_na_abi_version() { return 6; }

// Floats per query of the probabilities attnlab_na_forward can save for the backward pass
// (0 for a bad geometry or layout).
int64_t attnlab_na_probs_stride(const int32_t* dims, const int32_t* windows, int group, int group_rows, int sub_group) {
    Geometry geo;
    if (!make_geometry(dims, windows, 1.0f, geo) || with_layout(group, group_rows, sub_group, [](auto) { return 0; }))
        return 0;
    int64_t rows, width, sub_width;
    extents(geo, group, group_rows, sub_group, rows, width, sub_width);
    return rows * sub_width;
}

// A group is `group` queries: `group_rows` (1 or 2) consecutive query rows (axis 1) times
// group / group_rows consecutive queries along the last axis; their scores are computed
// `sub_group` queries at a time. A call covers heads bh0 .. bh1 - 1 and, in each, the flat group
// indices group0 .. group1 - 1 (row-major over (n0, ceil(n1 / group_rows), ceil(n2 / (group /
// group_rows))). probs (may be null): where to save the probabilities for the backward pass,
// probs_stride (attnlab_na_probs_stride) floats per query; the backward pass then reads them
// instead of recomputing q.k and exp. Returns 0 on success, 1 for a bad geometry or layout, 2 when
// memory ran out.
int attnlab_na_forward(const float* q, const float* k, const float* v, float* out, float* lse, float* probs,
                       int64_t probs_stride, int64_t bh0, int64_t bh1, int64_t group0, int64_t group1,
                       const int32_t* dims, const int32_t* windows, float scale, int group, int group_rows,
                       int sub_group) {
    return with_geometry(dims, windows, scale, [&](const Geometry& geo) {
        return with_layout(group, group_rows, sub_group, [&](auto layout) {
            using L = decltype(layout);
            return forward_impl<L::G, L::GY, L::SG>(q, k, v, out, lse, probs, probs_stride, bh0, bh1, group0, group1,
                                                    geo);
        });
    });
}

// probs: those saved by the forward call with the same geometry, or null (recomputed).
int attnlab_na_backward(const float* q, const float* k, const float* v, const float* o, const float* dout,
                        const float* lse, const float* probs, int64_t probs_stride, int zero_grads, float* dq,
                        float* dk, float* dv, int64_t bh0, int64_t bh1, int64_t group0, int64_t group1,
                        const int32_t* dims, const int32_t* windows, float scale, int group, int group_rows,
                        int sub_group) {
    return with_geometry(dims, windows, scale, [&](const Geometry& geo) {
        return with_layout(group, group_rows, sub_group, [&](auto layout) {
            using L = decltype(layout);
            return backward_impl<L::G, L::GY, L::SG>(q, k, v, o, dout, lse, probs, probs_stride, zero_grads != 0, dq,
                                                     dk, dv, bh0, bh1, group0, group1, geo);
        });
    });
}

}  // extern "C"
