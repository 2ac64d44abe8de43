"""The registry (MechanismSpec, register, create, get_spec, list_specs), the KVCache and the ContextCache."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import attnlab
from attnlab import ContextCache, KVCache, MechanismSpec
from attnlab.registry import register

BASE = dict(paper="test paper", year=2024, family="test", layout="seq", time="O(N)", memory="O(N)",
            exact=False)


def spec(name="_test_mech", **fields):
    return MechanismSpec(name=name, **{**BASE, **fields})


def module_class():
    class Mech(nn.Module):
        def __init__(self, dim, num_heads=8, *, alpha: float = 1.0):
            super().__init__()
            self.dim, self.num_heads, self.alpha = dim, num_heads, alpha

        def forward(self, x, *, attn_mask=None, is_causal=False, cache=None):
            return x
    return Mech


# --- list_specs --------------------------------------------------------------------------------

def test_list_specs_sorted_and_contains_mhsa():
    specs = attnlab.list_specs()
    names = [s.name for s in specs]
    assert names == sorted(names)
    assert "mhsa" in names
    assert len(set(names)) == len(names)


def test_list_specs_filters_by_field():
    seq = attnlab.list_specs(layout="seq")
    assert seq and all(s.layout == "seq" for s in seq)
    assert "mhsa" in {s.name for s in seq}
    assert "mhsa" not in {s.name for s in attnlab.list_specs(layout="2d")}
    causal = attnlab.list_specs(causal=True)
    assert all(s.causal for s in causal) and "mhsa" in {s.name for s in causal}
    assert all(not s.causal for s in attnlab.list_specs(causal=False))
    both = attnlab.list_specs(layout="seq", causal=True, exact=True)
    assert {s.name for s in both} == {s.name for s in seq if s.causal and s.exact}


def test_list_specs_filters_partition_the_catalogue():
    every = {s.name for s in attnlab.list_specs()}
    for value in (True, False):
        assert {s.name for s in attnlab.list_specs(attn_mask=value)} == \
            {s.name for s in attnlab.list_specs() if s.attn_mask is value}
    assert {s.name for s in attnlab.list_specs(causal=True)} | \
        {s.name for s in attnlab.list_specs(causal=False)} == every


def test_list_specs_tuple_field_membership():
    assert "mhsa" in {s.name for s in attnlab.list_specs(backends="flex")}
    assert all("flex" in s.backends for s in attnlab.list_specs(backends="flex"))
    assert attnlab.list_specs(backends="no_such_backend") == []
    # A tuple value compares the whole tuple.
    exact = attnlab.get_spec("mhsa").backends
    assert "mhsa" in {s.name for s in attnlab.list_specs(backends=exact)}
    assert "mhsa" not in {s.name for s in attnlab.list_specs(backends=exact[:1])}


def test_list_specs_unknown_filter_raises_type_error():
    with pytest.raises(TypeError, match="laytou"):
        attnlab.list_specs(laytou="seq")


# --- get_spec / create -------------------------------------------------------------------------

def test_get_spec_unknown_name_lists_close_names():
    with pytest.raises(ValueError) as info:
        attnlab.get_spec("mhas")
    msg = str(info.value)
    assert "'mhas'" in msg and "did you mean 'mhsa'" in msg, msg


def test_get_spec_far_name_lists_known():
    with pytest.raises(ValueError) as info:
        attnlab.get_spec("zzzzzzzz")
    assert "did you mean" not in str(info.value) and "mhsa" in str(info.value)


def test_get_spec_non_string_raises_type_error():
    with pytest.raises(TypeError):
        attnlab.get_spec(3)


def test_spec_lives_on_the_class():
    m = attnlab.create("mhsa", 32, 4)
    assert m.spec.name == "mhsa"
    assert type(m).spec is attnlab.get_spec("mhsa")
    assert attnlab.get_spec("mhsa").cls is type(m)


def test_create_unknown_option_names_it_and_suggests():
    with pytest.raises(TypeError) as info:
        attnlab.create("mhsa", 32, 4, qkv_bais=True)
    msg = str(info.value)
    assert "'qkv_bais'" in msg and "did you mean 'qkv_bias'" in msg, msg


def test_create_passes_dims_and_options():
    m = attnlab.create("mhsa", 48, 6, num_kv_heads=3)
    assert (m.dim, m.num_heads, m.num_kv_heads) == (48, 6, 3)


def test_create_not_divisible_raises():
    with pytest.raises(ValueError, match=r"30.*4"):
        attnlab.create("mhsa", 30, 4)


def test_options_exclude_dim_and_heads():
    opts = attnlab.get_spec("mhsa").options()
    assert "qkv_bias" in opts and "dim" not in opts and "num_heads" not in opts and "self" not in opts


def test_every_spec_test_kwargs_are_accepted_options():
    for s in attnlab.list_specs():
        assert set(s.test_kwargs) <= set(s.options()), s.name


# --- MechanismSpec -----------------------------------------------------------------------------

def test_spec_is_frozen():
    s = attnlab.get_spec("mhsa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.causal = False
    with pytest.raises(TypeError):
        s.test_kwargs["qkv_bias"] = False        # read-only mapping


def test_spec_test_kwargs_copied_not_shared():
    kwargs = {"alpha": 2.0}
    s = spec(test_kwargs=kwargs)
    kwargs["alpha"] = 3.0
    assert s.test_kwargs["alpha"] == 2.0


def test_spec_hash_and_equality_ignore_test_kwargs():
    a, b = spec(test_kwargs={"alpha": 1.0}), spec(test_kwargs={"alpha": 2.0})
    assert a == b and hash(a) == hash(b)
    assert spec() != spec(causal=True)


@pytest.mark.parametrize("fields", [dict(name="MHSA"), dict(name="not-an-identifier"),
                                    dict(layout="4d"), dict(backends=("sdpa", "cuda_magic"))],
                         ids=["upper", "dash", "layout", "backend"])
def test_spec_validation(fields):
    with pytest.raises(ValueError):
        spec(**fields)


def test_spec_backends_become_a_tuple():
    assert spec(backends=["sdpa"]).backends == ("sdpa",)


# --- provenance --------------------------------------------------------------------------------

@pytest.mark.parametrize("s", attnlab.list_specs(), ids=lambda s: s.name)
def test_every_registered_spec_says_where_its_formula_comes_from(s):
    """Issue 12 (Fidelity): official-code, paper or reconstruction, and a source that names the
    repository + file::function, the equations, or what was guessed."""
    assert s.provenance in attnlab.registry.PROVENANCES, (s.name, s.provenance)
    assert s.source.strip(), f"{s.name}: empty source"


@pytest.mark.parametrize("fields", [dict(provenance="folklore", source="x"), dict(provenance="paper")],
                         ids=["unknown", "no_source"])
def test_spec_provenance_validation(fields):
    with pytest.raises(ValueError, match="provenance"):
        spec(**fields)


# --- register ----------------------------------------------------------------------------------

def test_register_adds_and_create_builds(registry_snapshot):
    cls = register(spec(test_kwargs={"alpha": 0.5}))(module_class())
    assert cls.spec.cls is cls and cls.spec.test_kwargs == {"alpha": 0.5}
    assert "_test_mech" in {s.name for s in attnlab.list_specs(layout="seq")}
    m = attnlab.create("_test_mech", 16, 2, alpha=0.25)
    assert isinstance(m, cls) and (m.dim, m.num_heads, m.alpha) == (16, 2, 0.25)


def test_register_duplicate_name_raises(registry_snapshot):
    with pytest.raises(ValueError, match="mhsa"):
        register(spec("mhsa"))(module_class())
    first = register(spec("_test_dup"))(module_class())
    register(spec("_test_dup"))(first)            # the same class again (a re-import) is fine
    with pytest.raises(ValueError, match="_test_dup"):
        register(spec("_test_dup"))(module_class())
    assert attnlab.get_spec("_test_dup").cls is first
    assert attnlab.get_spec("mhsa").cls.__name__ == "MultiHeadAttention"


def test_register_rejects_non_modules(registry_snapshot):
    with pytest.raises(TypeError):
        register(spec("_test_bad"))(object)
    with pytest.raises(TypeError):
        register(spec("_test_bad"))(lambda x: x)
    assert "_test_bad" not in {s.name for s in attnlab.list_specs()}


# --- KVCache -----------------------------------------------------------------------------------

def kv(B=2, h=2, n=3, d=4, dv=None, dtype=torch.float64):
    return (torch.randn(B, h, n, d, dtype=dtype), torch.randn(B, h, n, d if dv is None else dv, dtype=dtype))


def test_cache_update_returns_everything_so_far():
    cache = KVCache()
    assert len(cache) == 0 and cache.keys is None and cache.values is None
    k1, v1 = kv(n=3)
    k2, v2 = kv(n=2)
    cache.update(k1, v1)
    keys, values = cache.update(k2, v2)
    assert len(cache) == 5
    assert torch.equal(keys, torch.cat([k1, k2], 2)) and torch.equal(values, torch.cat([v1, v2], 2))
    assert torch.equal(cache.keys, keys) and torch.equal(cache.values, values)


def test_cache_growth_beyond_initial_capacity_keeps_contents():
    cache = KVCache()
    ks, vs, buffers = [], [], set()
    for n in [10, 10] + [1] * 200 + [37]:
        k, v = kv(n=n, dv=5)
        ks.append(k)
        vs.append(v)
        keys, values = cache.update(k, v)
        buffers.add(cache._k.data_ptr())
    assert len(cache) == 257
    assert torch.equal(keys, torch.cat(ks, 2)) and torch.equal(values, torch.cat(vs, 2))
    # Amortised doubling: a handful of reallocations, not one per token.
    assert len(buffers) <= 8, len(buffers)


def test_cache_max_len_overflow_raises_and_keeps_state():
    cache = KVCache(max_len=4)
    k, v = kv(n=3)
    cache.update(k, v)
    with pytest.raises(ValueError) as info:
        cache.update(*kv(n=2))
    msg = str(info.value)
    assert "max_len=4" in msg and "3" in msg and "2" in msg, msg
    assert len(cache) == 3 and torch.equal(cache.keys, k)
    cache.update(*kv(n=1))                       # exactly full is fine
    assert len(cache) == 4


@pytest.mark.parametrize("max_len", [0, -1, 2.5, "8"])
def test_cache_bad_max_len(max_len):
    with pytest.raises(ValueError, match="max_len"):
        KVCache(max_len=max_len)


def test_cache_crop_then_append():
    cache = KVCache()
    k, v = kv(n=5)
    cache.update(k, v)
    cache.crop(2)
    assert len(cache) == 2 and torch.equal(cache.keys, k[:, :, :2]) and torch.equal(cache.values, v[:, :, :2])
    k2, v2 = kv(n=3)
    keys, values = cache.update(k2, v2)
    assert torch.equal(keys, torch.cat([k[:, :, :2], k2], 2))
    assert torch.equal(values, torch.cat([v[:, :, :2], v2], 2))
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=str(bad)):
            cache.crop(bad)
    cache.crop(0)
    assert len(cache) == 0


def test_cache_reset_forgets_shapes():
    cache = KVCache(max_len=8)
    cache.update(*kv(B=2, h=2, d=4))
    cache.reset()
    assert len(cache) == 0 and cache.keys is None
    k, v = kv(B=3, h=1, d=6, dtype=torch.float32)
    keys, _ = cache.update(k, v)
    assert torch.equal(keys, k) and cache.max_len == 8


@pytest.mark.parametrize("k_shape,v_shape", [((2, 2, 3, 4), (2, 2, 4, 4)),   # n differs
                                             ((2, 2, 3, 4), (2, 1, 3, 4)),   # heads differ
                                             ((2, 2, 3, 4), (1, 2, 3, 4)),   # batch differs
                                             ((2, 3, 4), (2, 3, 4))],        # 3-D
                         ids=["n", "heads", "batch", "rank"])
def test_cache_mismatched_k_v_raise(k_shape, v_shape):
    with pytest.raises(ValueError) as info:
        KVCache().update(torch.randn(k_shape), torch.randn(v_shape))
    assert str(tuple(k_shape)) in str(info.value) and str(tuple(v_shape)) in str(info.value)


@pytest.mark.parametrize("change", ["batch", "heads", "d", "dv", "k_dtype"])
def test_cache_later_update_must_match(change):
    cache = KVCache()
    cache.update(*kv(B=2, h=2, d=4, dv=4))
    shape = dict(B=2, h=2, d=4, dv=4)
    dtype = torch.float64
    if change == "batch":
        shape["B"] = 3
    elif change == "heads":
        shape["h"] = 1
    elif change in ("d", "dv"):
        shape[change] = 5
    else:
        dtype = torch.float32
    with pytest.raises(ValueError, match="one cache per layer"):
        cache.update(*kv(n=1, dtype=dtype, **shape))
    assert len(cache) == 3


def test_cache_v_dtype_change_raises():
    """A v of another dtype must not be cast silently into the cache's buffer."""
    cache = KVCache()
    cache.update(*kv())
    k, v = kv(n=1)
    with pytest.raises(ValueError):
        cache.update(k, v.float())


def test_cache_keeps_gradient_path_for_new_tokens():
    cache = KVCache()
    cache.update(*kv(n=3))
    k, v = (t.requires_grad_(True) for t in kv(n=2))
    keys, values = cache.update(k, v)
    assert keys.requires_grad and values.requires_grad
    gk, gv = torch.autograd.grad(keys.sum() + 2 * values.sum(), (k, v))
    assert torch.equal(gk, torch.ones_like(k)) and torch.equal(gv, 2 * torch.ones_like(v))


def test_cache_repr_mentions_length():
    cache = KVCache(max_len=10)
    cache.update(*kv(n=3))
    assert "length=3" in repr(cache) and "max_len=10" in repr(cache)



# --- ContextCache ------------------------------------------------------------------------------

class _Projector:
    """project(context) -> (k, v) of shape (B, 2, M, 3), counting its calls."""

    def __init__(self):
        self.calls = 0
        self.w = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)

    def __call__(self, context):
        self.calls += 1
        B, M, _ = context.shape
        k, v = (context @ self.w).reshape(B, M, 2, 2, 3).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v


def test_context_cache_projects_once_and_reuses():
    cache, project = ContextCache(), _Projector()
    assert not cache.full and len(cache) == 0 and cache.keys is None and "empty" in repr(cache)
    ctx = torch.randn(2, 5, 4, dtype=torch.float64)
    k, v = cache.fetch(ctx, project)
    assert k.requires_grad                                   # the filling call keeps its graph
    k2, v2 = cache.fetch(ctx, project)
    assert project.calls == 1 and cache.full and len(cache) == 5
    assert torch.equal(k2, k) and torch.equal(v2, v) and not k2.requires_grad
    assert cache.keys.shape == cache.values.shape == (2, 2, 5, 3)
    assert "(2, 5, 4)" in repr(cache)


@pytest.mark.parametrize("change", ["batch", "length", "width", "dtype"])
def test_context_cache_refuses_another_context_until_reset(change):
    cache, project = ContextCache(), _Projector()
    ctx = torch.randn(2, 5, 4, dtype=torch.float64)
    cache.fetch(ctx, project)
    other = {"batch": ctx[:1], "length": ctx[:, :3], "width": torch.randn(2, 5, 3, dtype=torch.float64),
             "dtype": ctx.float()}[change]
    with pytest.raises(ValueError, match=r"reset\(\)") as info:
        cache.fetch(other, project)
    assert "(2, 5, 4)" in str(info.value) and str(tuple(other.shape)) in str(info.value)
    assert project.calls == 1
    cache.reset()
    assert not cache.full and len(cache) == 0
    if change != "width" and change != "dtype":
        cache.fetch(other, project)
        assert project.calls == 2 and len(cache) == other.shape[1]


def test_context_cache_serves_one_owner():
    cache, project = ContextCache(), _Projector()
    a, b = nn.Linear(1, 1), nn.Linear(1, 1)
    ctx = torch.randn(2, 5, 4, dtype=torch.float64)
    cache.fetch(ctx, project, owner=a)
    cache.fetch(ctx, project, owner=a)
    with pytest.raises(ValueError, match="one cache per layer"):
        cache.fetch(ctx, project, owner=b)
    with pytest.raises(TypeError, match="Tensor"):
        cache.fetch(None, project)


def test_test_configs_are_frozen_mappings():
    import types

    spec = attnlab.get_spec("mhsa")
    assert spec.test_configs, "mhsa declares extra configurations for the property suite"
    assert all(isinstance(c, types.MappingProxyType) for c in spec.test_configs)
    with pytest.raises(TypeError):
        spec.test_configs[0]["qkv_bias"] = False
    for config in spec.test_configs:   # each one builds
        attnlab.create("mhsa", 32, 4, **config)


def test_a_context_cache_given_to_a_sequence_layer_says_what_it_is():
    import torch
    m = attnlab.create("mhsa", 16, 2)
    with pytest.raises(TypeError, match="KVCache"):
        m(torch.randn(1, 3, 16), cache=attnlab.ContextCache())
