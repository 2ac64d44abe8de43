"""Text-line recognition (CTC) on rendered lines: tiny-shakespeare snippets in handwriting-style fonts.

No handwriting line set (IAM, RIMES, Bentham) installs offline, so the lines are synthetic:

- source="shakespeare": a snippet of 1..max_chars characters (whole words) of tiny-shakespeare
  (attnlab._data.find_corpus; the first 90% of the text for train, the last 10% for val),
  rendered with Pillow in one of the handwriting fonts that Debian packages ship (fonts-bwht,
  fonts-breip, fonts-dkg-handwriting, fonts-femkeklaver, fonts-rufscript, fonts-sjfonts; installed
  by scripts/setup.sh). The fonts are split: TRAIN_FONTS render the train lines, HELD_OUT_FONTS
  (three unseen hands) the val lines, so val measures recognition of writing styles never seen.
  By default the text is lower-cased (`lowercase=True`): the bwht fonts write capitals for
  every letter, so case cannot be read from them.
- source="digits": strings of 3..6 scikit-learn 8x8 handwritten digits side by side (digits of
  the digits task's train split for train, of its val split for val: held-out writers' samples).

Every line: rendered at twice the target height, cropped to the font's ink band, then (when
`augment`) thickened (ink noise: a 3x3 max filter), slanted/rotated/stretched (affine),
resized to `height` pixels, blurred, given a random ink strength, Gaussian noise and speckles;
ink is 1, paper 0; left-aligned in a (height, max_width) canvas (squeezed when wider). A batch
is a pure function of (options, seed, split, index): every random choice comes from the task's
generator for that batch.

batch = {"inputs": (B, 1, height, max_width) float32, "targets": (B, max_chars) int64 class ids
(1..len(charset), 0-padded), "target_lengths": (B,) int64}. The model is HTR-JAND
(attnlab.models.htr_jand): its CTC logits (B, T, K); quality = "cer" (character error rate of the
greedy decoding, lower is better), also "wer", "ctc" and (with a teacher) "kd".

Distillation: `teacher=RUN_DIR` names an `attnlab train` run folder of this task (its latest
checkpoint is read with attnlab's own safetensors loader, never unpickled). The frozen teacher
runs in eval mode beside the student and the loss becomes

    ctc(student) + kd_weight * tau^2 * mean over frames KL(softmax(z_t / tau) || softmax(z_s / tau)),

so `attnlab train --task htr_lines --task-option teacher=RUN_DIR` trains a distilled student.
kind is "classify" (per-frame classification; attnlab has no sequence-recognition kind).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from attnlab._data import find_corpus
from attnlab.models.htr_jand import BLANK, HTRJAND, ctc_loss, distillation_kl, error_rates, greedy_decode
from attnlab.tasks import Batch, Task, register_task

FONT_ENV = "ATTNLAB_HTR_FONTS"
FONT_ROOT = Path("/usr/share/fonts")
# font file -> the Debian package that ships it (breipfont.ttf duplicates Breip.ttf and is not used).
FONT_PACKAGES = {
    "BecauseWeBuild-Regular.otf": "fonts-bwht", "BecauseWeConnect-Regular.otf": "fonts-bwht",
    "BecauseWeCreate-Regular.otf": "fonts-bwht", "BecauseWeLearn-Regular.otf": "fonts-bwht",
    "BecauseWeOrganize-Regular.otf": "fonts-bwht", "BecauseWeMentor-Regular.otf": "fonts-bwht",
    "Breip.ttf": "fonts-breip", "dkg.ttf": "fonts-dkg-handwriting", "dkgBd.ttf": "fonts-dkg-handwriting",
    "dkgIt.ttf": "fonts-dkg-handwriting", "dkgBI.ttf": "fonts-dkg-handwriting",
    "Rufscript010.ttf": "fonts-rufscript", "SteveHand.ttf": "fonts-sjfonts", "Delphine.ttf": "fonts-sjfonts",
    "femkeklaver.ttf": "fonts-femkeklaver",
}
HELD_OUT_FONTS = ("BecauseWeMentor-Regular.otf", "Delphine.ttf", "femkeklaver.ttf")
TRAIN_FONTS = tuple(f for f in FONT_PACKAGES if f not in HELD_OUT_FONTS)
PUNCTUATION = " !&',-.:;?"
LOWER, UPPER, DIGITS = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789"
TRAIN_FRACTION = 0.9
SOURCES = ("shakespeare", "digits")
DEFAULTS = {"shakespeare": dict(height=32, max_width=128, min_chars=3, max_chars=10),
            "digits": dict(height=16, max_width=128, min_chars=3, max_chars=6)}
INK_BAND = "bdfhklgjpqy|"          # glyphs whose ink spans a font's ascender-to-descender band

_TEXTS: dict[tuple[str, bool], str] = {}
# Rendered batches (uint8 pixels, targets, lengths) by (data options, split, index, batch size), oldest
# dropped first: 2,500 batches of 32 lines of 32 x 128 px take about 0.33 GB.
BATCH_CACHE = int(os.environ.get("ATTNLAB_HTR_CACHE", "2500"))
_BATCHES: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def find_fonts(font_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """{font file name: path} of the known fonts found under font_dir / $ATTNLAB_HTR_FONTS / /usr/share/fonts."""
    if font_dir is not None:
        root, origin = Path(font_dir).expanduser(), f"font_dir={str(font_dir)!r}"
    elif os.environ.get(FONT_ENV):
        root, origin = Path(os.environ[FONT_ENV]).expanduser(), f"{FONT_ENV}={os.environ[FONT_ENV]!r}"
    else:
        root, origin = FONT_ROOT, "the default location"
    found: dict[str, Path] = {}
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.name in FONT_PACKAGES and path.name not in found and path.is_file():
                found[path.name] = path
    if not any(f in found for f in TRAIN_FONTS) or not any(f in found for f in HELD_OUT_FONTS):
        packages = " ".join(sorted(set(FONT_PACKAGES.values())))
        raise FileNotFoundError(
            f"htr_lines: {origin} ({root}) lacks the handwriting fonts (found {sorted(found) or 'none'}; needed at "
            f"least one of the train fonts and one of the held-out fonts {list(HELD_OUT_FONTS)}). Install the "
            f"Debian packages: sudo apt-get install {packages} (or re-run scripts/setup.sh), or set {FONT_ENV} "
            "to a folder holding those font files; source=digits needs no fonts.")
    return found


def corpus_text(path: Path, lowercase: bool) -> str:
    """The corpus as one line of the characters of `charset(lowercase)`: newlines -> spaces, runs of spaces
    collapsed, other characters dropped. Cached per process."""
    key = (str(path.resolve()), lowercase)
    if key not in _TEXTS:
        text = path.read_text(encoding="utf-8")
        text = text.lower() if lowercase else text
        keep = set(charset("shakespeare", lowercase))
        text = "".join(c if c in keep else (" " if c.isspace() else "") for c in text)
        _TEXTS[key] = " ".join(text.split())
    return _TEXTS[key]


def charset(source: str, lowercase: bool = True) -> str:
    """The characters of a source, in class-id order: character i has class i + 1 (0 is the CTC blank)."""
    if source == "digits":
        return DIGITS
    return PUNCTUATION + LOWER + ("" if lowercase else UPPER)


@functools.lru_cache(maxsize=64)
def _font(path: str, size: int):
    from PIL import ImageFont
    return ImageFont.truetype(path, size)


def render_text(text: str, font_path: str | os.PathLike, size: int):
    """`text` in the font at `size` px as a PIL 'L' image, ink 255 on 0, cropped to the font's ink band
    (the rows of INK_BAND and of the text) and to the text's ink columns, with a 2-px margin."""
    from PIL import Image, ImageDraw
    font = _font(str(font_path), int(size))
    band = font.getbbox(INK_BAND)                           # (left, top, right, bottom) from the ascender origin
    box = font.getbbox(text)
    top, bottom = min(band[1], box[1]), max(band[3], box[3])
    left, right = box[0], box[2]
    pad = 2
    image = Image.new("L", (max(1, right - left) + 2 * pad, max(1, bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, font=font, fill=255)
    return image


def augment_image(image, rng: np.random.Generator, height: int, augment: bool):
    """A rendered line (PIL 'L', ink 255) -> float32 (height, w) in [0, 1]: affine, ink, resize, blur, noise."""
    from PIL import Image, ImageFilter
    if augment:
        if rng.random() < 0.3:                               # ink noise: thicker strokes (thinning erased thin hands)
            image = image.filter(ImageFilter.MaxFilter(3))
        shear = rng.uniform(-0.35, 0.35)                     # slant: x' = x + shear * (y - h / 2)
        w, h = image.size
        extra = int(abs(shear) * h) + 1
        # PIL's AFFINE maps output (x, y) to input (a x + b y + c, d x + e y + f).
        image = image.transform((w + extra, h), Image.AFFINE,
                                (1.0, shear, -extra / 2 - shear * h / 2, 0.0, 1.0, 0.0),
                                resample=Image.BILINEAR)
        image = image.rotate(rng.uniform(-2.0, 2.0), resample=Image.BILINEAR, expand=True)
        stretch = rng.uniform(0.8, 1.2)
    else:
        stretch = 1.0
    w, h = image.size
    image = image.resize((max(1, int(round(w * height / h * stretch))), height), Image.BILINEAR)
    if augment and rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    x = np.asarray(image, dtype=np.float32) / 255.0          # (height, w)
    if augment:
        x = x * rng.uniform(0.7, 1.0)                        # ink strength
        x = x + rng.normal(0.0, rng.uniform(0.0, 0.08), x.shape).astype(np.float32)
        speckle = rng.random(x.shape) < rng.uniform(0.0, 0.01)
        x = np.where(speckle, rng.random(x.shape).astype(np.float32), x)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def place(line: np.ndarray, max_width: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    """Left-align a (height, w) line in a (height, max_width) canvas of zeros, squeezing it when too wide."""
    from PIL import Image
    height, w = line.shape
    offset = int(rng.integers(0, 5)) if augment else 2
    if w > max_width - offset:
        line = np.asarray(Image.fromarray(line, mode="F").resize((max_width - offset, height), Image.BILINEAR))
        w = line.shape[1]
    canvas = np.zeros((height, max_width), dtype=np.float32)
    canvas[:, offset:offset + w] = line
    return canvas


@register_task
class HTRLines(Task):
    name = "htr_lines"
    kind = "classify"
    quality = "cer"
    higher_is_better = False
    causal = False
    description = ("text-line recognition (CTC) on rendered lines: tiny-shakespeare in handwriting fonts, "
                   "val on held-out fonts (or sklearn digit strings); CER of greedy decoding")

    def __init__(self, seed: int = 0, *, source: str = "shakespeare", height: int | None = None,
                 max_width: int | None = None, min_chars: int | None = None, max_chars: int | None = None,
                 lowercase: bool = True, augment: bool = True, teacher: str | None = None, tau: float = 2.0,
                 kd_weight: float = 1.0, path: str | None = None, font_dir: str | None = None):
        super().__init__(seed)
        if source not in SOURCES:
            raise ValueError(f"htr_lines: source must be one of {SOURCES}, got {source!r}")
        d = DEFAULTS[source]
        height = d["height"] if height is None else height
        max_width = d["max_width"] if max_width is None else max_width
        min_chars = d["min_chars"] if min_chars is None else min_chars
        max_chars = d["max_chars"] if max_chars is None else max_chars
        for arg, v, low in (("height", height, 8), ("max_width", max_width, 16), ("min_chars", min_chars, 1),
                            ("max_chars", max_chars, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"htr_lines: {arg} must be an int >= {low}, got {v!r}")
        if min_chars > max_chars:
            raise ValueError(f"htr_lines: min_chars ({min_chars}) exceeds max_chars ({max_chars})")
        if max_width // 4 < 2 * max_chars:
            raise ValueError(f"htr_lines: max_width={max_width} gives {max_width // 4} CTC frames, fewer than "
                             f"2 * max_chars = {2 * max_chars} (CTC needs room for repeats); raise max_width")
        for arg, v in (("lowercase", lowercase), ("augment", augment)):
            if not isinstance(v, bool):
                raise TypeError(f"htr_lines: {arg} must be a bool, got {v!r}")
        for arg, v in (("tau", tau), ("kd_weight", kd_weight)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"htr_lines: {arg} must be a positive number, got {v!r}")
        if teacher is not None and not isinstance(teacher, (str, os.PathLike)):
            raise TypeError(f"htr_lines: teacher must be a run folder (str) or None, got {type(teacher).__name__}")
        self.source, self.height, self.max_width = source, height, max_width
        self.min_chars, self.max_chars, self.lowercase, self.augment = min_chars, max_chars, lowercase, augment
        self.tau, self.kd_weight = float(tau), float(kd_weight)
        self.path_option = None if path is None else str(path)
        self.font_dir_option = None if font_dir is None else str(font_dir)
        self.teacher_option = None if teacher is None else str(teacher)
        self.charset = charset(source, lowercase)
        self.lookup = {c: i + 1 for i, c in enumerate(self.charset)}
        if source == "shakespeare":
            found = find_fonts(font_dir)
            self.fonts = {"train": [found[f] for f in TRAIN_FONTS if f in found],
                          "val": [found[f] for f in HELD_OUT_FONTS if f in found]}
            text = corpus_text(find_corpus(path), lowercase)
            cut = int(len(text) * TRAIN_FRACTION)
            self.texts = {"train": text[:cut], "val": text[cut:]}
        else:
            from attnlab.tasks.digits import load_digits_split
            train_x, train_y, val_x, val_y = load_digits_split()
            self.fonts = {}
            self.digits = {"train": (train_x, train_y), "val": (val_x, val_y)}
        self.teacher = self._load_teacher(teacher) if teacher is not None else None

    # -- options ------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "source": self.source, "height": self.height, "max_width": self.max_width,
                "min_chars": self.min_chars, "max_chars": self.max_chars, "lowercase": self.lowercase,
                "augment": self.augment, "teacher": self.teacher_option, "tau": self.tau,
                "kd_weight": self.kd_weight, "path": self.path_option, "font_dir": self.font_dir_option}

    @property
    def num_classes(self) -> int:
        return len(self.charset)

    @property
    def seq_len(self) -> int:
        return self.max_width // 4                             # CTC frames with the default stages

    def font_names(self, split: str) -> list[str]:
        return [p.name for p in self.fonts.get(split, [])]

    # -- data ---------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        try:
            return [self.lookup[c] for c in text]
        except KeyError as e:
            raise ValueError(f"htr_lines: character {e.args[0]!r} is not in the charset {self.charset!r}") from None

    def decode_ids(self, ids: Sequence[int]) -> str:
        return "".join(self.charset[i - 1] for i in ids if 0 < i <= len(self.charset))

    def snippet(self, split: str, rng: np.random.Generator) -> str:
        """Whole words of the split's text, at most a random length in [min_chars, max_chars]."""
        text = self.texts[split]
        target = int(rng.integers(self.min_chars, self.max_chars + 1))
        start = int(rng.integers(0, len(text) - 4 * self.max_chars))
        start = text.find(" ", start) + 1                      # the start of a word
        words, length = [], 0
        for word in text[start:start + 4 * self.max_chars].split(" "):
            extra = len(word) + (1 if words else 0)
            if words and length + extra > target:
                break
            words.append(word)
            length += extra
        return " ".join(words)[:self.max_chars]

    def line(self, split: str, rng: np.random.Generator, *, fonts: str | None = None) -> tuple[np.ndarray, str]:
        """One (height, max_width) float32 line and its text; `fonts` ("train" or "val") overrides which
        split's fonts render the split's text."""
        from PIL import Image
        if self.source == "shakespeare":
            text = self.snippet(split, rng)
            while not text.strip():
                text = self.snippet(split, rng)
            fonts = self.fonts[fonts or split]
            font = fonts[int(rng.integers(0, len(fonts)))]
            image = render_text(text, font, 2 * self.height)
        else:
            images, labels = self.digits[split]
            k = int(rng.integers(self.min_chars, self.max_chars + 1))
            rows = rng.integers(0, len(labels), k)
            parts = []
            for r in rows:                                     # 8x8 digits (0..16) with 0-2 px gaps
                parts.append(images[r].astype(np.float32) * (255.0 / 16.0))
                parts.append(np.zeros((8, int(rng.integers(0, 3))), dtype=np.float32))
            strip = np.pad(np.concatenate(parts, 1), ((1, 1), (1, 1)))          # (10, w)
            image = Image.fromarray(strip.astype(np.uint8), mode="L").resize((strip.shape[1] * 4, 40),
                                                                              Image.BILINEAR)
            text = "".join(DIGITS[int(labels[r])] for r in rows)
        line = augment_image(image, rng, self.height, self.augment)
        return place(line, self.max_width, rng, self.augment), text

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """Batch `index` of `split`. Pixels are quantised to 1/255 steps (uint8), so that a batch can be
        kept in a per-process cache (BATCH_CACHE batches, shared by every task instance with the same
        data options: the runs of a claim render each batch once) and is the same either way."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = self.generator(split, index)                       # validates split and index
        data = {k: v for k, v in self.options().items() if k not in ("teacher", "tau", "kd_weight")}
        key = (tuple(sorted(data.items())), split, index, batch_size)
        if key not in _BATCHES:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
            pixels = np.zeros((batch_size, 1, self.height, self.max_width), dtype=np.uint8)
            targets = torch.zeros(batch_size, self.max_chars, dtype=torch.long)
            lengths = torch.zeros(batch_size, dtype=torch.long)
            for b in range(batch_size):
                line, text = self.line(split, rng)
                pixels[b, 0] = np.round(line * 255.0).astype(np.uint8)
                ids = self.encode_text(text)
                targets[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                lengths[b] = len(ids)
            while len(_BATCHES) >= BATCH_CACHE:
                _BATCHES.pop(next(iter(_BATCHES)))             # the oldest first
            _BATCHES[key] = (torch.from_numpy(pixels), targets, lengths)
        pixels, targets, lengths = _BATCHES[key]
        return {"inputs": pixels.float() / 255.0, "targets": targets.clone(), "target_lengths": lengths.clone()}

    def seen_font_batch(self, index: int, batch_size: int) -> Batch:
        """Val text rendered in the *train* fonts (not cached; its own random stream): with the val split,
        it separates recognising unseen text in seen hands from generalising to unseen hands."""
        if self.source != "shakespeare":
            raise ValueError("htr_lines: seen_font_batch needs source='shakespeare' (digit strings have no fonts)")
        g = self.generator("val", index)
        rng = np.random.default_rng([int(torch.randint(0, 2**62, (1,), generator=g)), 1])
        pixels = np.zeros((batch_size, 1, self.height, self.max_width), dtype=np.uint8)
        targets = torch.zeros(batch_size, self.max_chars, dtype=torch.long)
        lengths = torch.zeros(batch_size, dtype=torch.long)
        for b in range(batch_size):
            line, text = self.line("val", rng, fonts="train")
            pixels[b, 0] = np.round(line * 255.0).astype(np.uint8)
            ids = self.encode_text(text)
            targets[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            lengths[b] = len(ids)
        return {"inputs": torch.from_numpy(pixels).float() / 255.0, "targets": targets, "target_lengths": lengths}

    def texts_of(self, batch: Batch) -> list[str]:
        return [self.decode_ids(row[:n].tolist()) for row, n in zip(batch["targets"], batch["target_lengths"])]

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, attention: bool = True,
                    mlp_ratio: float = 2.0, **block_options) -> nn.Module:
        """HTRJAND over this task's lines; attention=False turns every layer into a block without attention
        (the ablation), block_options go to HTRJAND (width, se_reduction, conv_drop, drop, positions, ...)."""
        if not isinstance(attention, bool):
            raise TypeError(f"htr_lines: the block option attention must be a bool, got {attention!r}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["combined"] * layers
        layers = list(layers) if attention else [None] * len(layers)
        return HTRJAND(self.num_classes, dim, num_heads, layers, in_height=self.height, mlp_ratio=mlp_ratio,
                       **block_options)

    def _load_teacher(self, run_dir: str) -> nn.Module:
        """The teacher of a run folder of this task: rebuilt from its config, weights from its latest checkpoint."""
        from attnlab.train.checkpoint import find_checkpoint, load_weights
        folder, state = find_checkpoint(run_dir)
        config = state["config"]
        if config.get("task") != self.name:
            raise ValueError(f"htr_lines: teacher={run_dir!r} is a run of task {config.get('task')!r}, "
                             f"expected {self.name!r}")
        theirs = {"source": "shakespeare", "lowercase": True, **config.get("task_options", {})}
        mine = self.options()
        for key in ("source", "height", "max_width", "lowercase"):
            value = theirs.get(key, DEFAULTS[theirs["source"]].get(key))
            if value is not None and value != mine[key]:
                raise ValueError(f"htr_lines: teacher={run_dir!r} was trained with {key}={value!r}, this task has "
                                 f"{key}={mine[key]!r}; the teacher's frames must match the student's")
        block = dict(config.get("block_options", {}))
        teacher = self.build_model(config["dim"], config["num_heads"], config["layers"],
                                   mlp_ratio=config.get("mlp_ratio", 2.0), **block)
        load_weights(folder, teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        images, targets, lengths = batch["inputs"], batch["targets"], batch["target_lengths"]
        logits = model(images)                                              # (B, T, K)
        B, T, K = logits.shape
        if B != targets.shape[0] or K != self.num_classes + 1:
            raise ValueError(f"htr_lines: expected logits ({targets.shape[0]}, T, {self.num_classes + 1}), "
                             f"got {tuple(logits.shape)}")
        ctc = ctc_loss(logits, targets, lengths, blank=BLANK)
        loss, metrics = ctc, {"ctc": ctc.item()}
        if self.teacher is not None:
            if next(self.teacher.parameters()).device != images.device:
                self.teacher.to(images.device)
            with torch.no_grad():
                teacher_logits = self.teacher(images)
            kd = distillation_kl(logits, teacher_logits, self.tau)
            loss = ctc + self.kd_weight * self.tau ** 2 * kd
            metrics["kd"] = kd.item()
        with torch.no_grad():
            predictions = [self.decode_ids(ids) for ids in greedy_decode(logits.detach())]
            rates = error_rates(predictions, self.texts_of(batch))
        return loss, {"loss": loss.item(), **metrics, "cer": rates["cer"], "wer": rates["wer"]}


__all__ = ["HTRLines", "find_fonts", "charset", "render_text", "augment_image", "place", "corpus_text",
           "TRAIN_FONTS", "HELD_OUT_FONTS", "FONT_PACKAGES"]
