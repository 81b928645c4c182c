"""``demo`` — a synthetic chest-radiograph phantom drawn by our own code, so the harness runs with no download.

Every image is a pure function of (GENERATOR_VERSION, PhantomConfig, image index): the table (labels, sex, age,
patients) and every drawing parameter are drawn in ``__init__`` from one seeded generator per patient, and
``load_image(i)`` renders image ``i`` lazily from those parameters plus a generator seeded by (seed, i) only, so the
result does not depend on the order in which images are asked for. (numpy's SIMD float32 exp/tanh may differ in the
last bit between CPUs; the content digest deliberately ignores that.) Labels, sex and age never need an image.

The anatomy is a PA view drawn as an attenuation map (soft-tissue body, air-filled lungs, mediastinum, heart,
diaphragm domes, posterior and anterior ribs, clavicles, spine, vascular markings from the hila), turned into
brightness by an exponential exposure curve, with a smooth bias field, quantum-like noise and a small pose jitter.
Sex and age act on the anatomy: men have wider thoraces and larger hearts, women have breast shadows over the lower
zones; with age the bones lose density (ribs lose contrast), the aortic knuckle grows and the lungs shorten a little.

Findings (each with its own prevalence, sizes and contrasts from obvious to subtle):
- effusion: fluid at a lung base with a meniscus rising laterally, blunting the costophrenic angle;
- nodule: a small round opacity somewhere in a lung field (same place at every visit of a patient);
- pneumothorax: the lung collapsed away from the apex and lateral wall, a lucent rim without vascular markings
  behind a thin visceral pleural line;
- cardiomegaly: a cardiothoracic ratio above 0.5 (normal hearts stay below 0.5).

Patients have 1 to ``max_images_per_patient`` visits with the same anatomy and age; a finding persists from one
visit to the next with a per-finding probability and is otherwise redrawn at its prevalence, so the prevalence of
each label is the configured one at every visit while patients stay correlated (patient-level splits matter).

The ``lungs`` mask is the anatomical lung field a reader would outline: inside the pleural outline, lateral to the
mediastinum and heart borders, above the diaphragm. Findings inside the pleural space (effusion, pneumothorax,
nodule) do not change it: with a pneumothorax the mask keeps the whole pleural cavity, not the collapsed lung.
Cardiomegaly does change it, since the heart border is the medial edge of the left lung field.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np

from harness.common.hashing import sha256_chunks
from harness.common.options import parse_options
from harness.tasks.base import Task, TaskContext, TaskError, TaskTable

#: Bump whenever the drawing or the parameter sampling changes: it is part of the content digest (feature cache key).
GENERATOR_VERSION = "demo-phantom-1"
LABEL_NAMES = ("effusion", "nodule", "pneumothorax", "cardiomegaly")


@dataclass(frozen=True)
class PhantomConfig:
    # Small on purpose: `demo` is the README's first command, which should come back in minutes on a 2-core CPU
    # (random-vit's features and segmentation heads scale with the images). 120 patients draw 241 images, 40% of
    # the earlier default's 596 (`demo:n_patients=300`), and every label keeps --min-positive-patients' 5 positive
    # test patients at the default split (seed 0, 30% test); tests/harness/tasks/test_demo.py checks both.
    n_patients: int = 120
    size: int = 256
    max_images_per_patient: int = 3
    p_effusion: float = 0.15
    p_nodule: float = 0.15
    p_pneumothorax: float = 0.12
    p_cardiomegaly: float = 0.15
    missing_sex: float = 0.03  # fraction of patients whose sex is withheld from the table (the anatomy keeps one)
    missing_age: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_patients < 1 or self.size < 32 or self.max_images_per_patient < 1:
            raise TaskError(f"demo: need n_patients >= 1, size >= 32, max_images_per_patient >= 1; got {self}")
        for f in ("p_effusion", "p_nodule", "p_pneumothorax", "p_cardiomegaly", "missing_sex", "missing_age"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise TaskError(f"demo: {f}={getattr(self, f)} must be within [0, 1]")

    @property
    def prevalences(self) -> tuple[float, ...]:
        return (self.p_effusion, self.p_nodule, self.p_pneumothorax, self.p_cardiomegaly)


# Per label (LABEL_NAMES order): probability that a finding's presence or absence at one visit is carried to the
# next rather than redrawn. Nodules and enlarged hearts persist; pneumothoraces come and go.
_PERSISTENCE = (0.6, 0.85, 0.4, 0.9)


@dataclass(frozen=True)
class Anatomy:
    """One patient's body, shared by all their visits. Lengths are in image widths (x from the centre, positive
    towards image right = the patient's left) and image heights (y from the top)."""

    sex: str
    age: float
    half_width: float       # lateral extent of the lung fields from the midline
    apex_y: float
    dome_y: tuple[float, float]  # top of the right (image-left) and left hemidiaphragm
    dome_depth: float       # how far the costophrenic angles lie below the domes
    mediastinum: float      # half-width of the upper mediastinum
    ctr: float              # cardiothoracic ratio without cardiomegaly
    ctr_enlarged: float     # ... and with it
    heart_shift: float      # centre of the heart from the midline
    knuckle: float          # radius of the aortic knuckle; grows with age
    bone: float             # bone density; falls with age
    breast: float           # 0 for men
    rib_spacing: float
    rib_phase: float
    texture_seed: int       # the vascular pattern, identical at every visit
    nodule_radius: float
    nodule_contrast: float
    effusion_sides: tuple[int, ...]  # -1 image left (patient right), +1 image right
    pneumothorax_side: int


@dataclass(frozen=True)
class View:
    """One visit: pose, exposure, and which findings show, at what size (0 = absent)."""

    angle: float
    scale: float
    shift: tuple[float, float]
    exposure: float
    noise: float
    effusion: float         # fluid height above the costophrenic angle
    nodule: float           # size factor on the patient's nodule
    pneumothorax: float     # fraction by which the lung has collapsed
    cardiomegaly: bool

    @property
    def labels(self) -> tuple[int, int, int, int]:
        return (int(self.effusion > 0), int(self.nodule > 0), int(self.pneumothorax > 0), int(self.cardiomegaly))


# ---------------------------------------------------------------------------------------------------- sampling

def _sample_anatomy(rng: np.random.Generator) -> Anatomy:
    sex = "M" if rng.random() < 0.5 else "F"
    age = float(np.clip(rng.normal(55, 17), 18, 95))
    old = (age - 50) / 30  # about -1 .. +1.5
    half_width = rng.normal(0.35 if sex == "M" else 0.33, 0.014)
    # Kyphosis-like shortening of the lung fields with age: the apex comes down and the domes come up.
    apex_y = rng.normal(0.13, 0.01) + 0.012 * old
    dome_right = rng.normal(0.70, 0.02) - 0.015 * old
    # Normal hearts stay below a cardiothoracic ratio of 0.5 and enlarged ones start just above it: borderline
    # cases on both sides keep cardiomegaly from being trivial.
    ctr = float(np.clip(rng.normal(0.46 + (0.01 if sex == "M" else 0.0) + 0.01 * old, 0.035), 0.37, 0.499))
    return Anatomy(
        sex=sex, age=age, half_width=half_width, apex_y=apex_y,
        dome_y=(dome_right, dome_right + rng.uniform(0.01, 0.035)),
        dome_depth=rng.uniform(0.05, 0.08),
        mediastinum=rng.normal(0.062, 0.005),
        ctr=ctr, ctr_enlarged=0.505 + min(rng.exponential(0.045), 0.15),
        heart_shift=rng.normal(-0.015, 0.012),
        knuckle=float(np.clip(0.022 + 0.008 * old + rng.normal(0, 0.003), 0.012, 0.045)),
        bone=float(np.clip(1.0 - 0.22 * old + rng.normal(0, 0.06), 0.45, 1.3)),
        breast=rng.uniform(0.0, 1.0) if sex == "F" else 0.0,
        rib_spacing=rng.normal(0.074, 0.004),
        rib_phase=rng.uniform(0, 1),
        texture_seed=int(rng.integers(2**31)),
        nodule_radius=rng.uniform(0.01, 0.03),
        nodule_contrast=rng.uniform(0.06, 0.35),
        effusion_sides=((-1,), (1,), (-1, 1))[rng.choice(3, p=[0.4, 0.35, 0.25])],
        pneumothorax_side=int(rng.choice([-1, 1])),
    )


@lru_cache(maxsize=4096)
def nodule_site(a: Anatomy) -> tuple[float, float]:
    """Where the patient's nodule sits (whether or not a visit shows it): a point well inside a lung field, a nodule
    radius clear of every border even of an enlarged heart, by rejection from the lungs' bounding box. Drawn lazily
    (from the patient's own seed) because it costs more than the rest of the patient's parameters together."""
    rng = np.random.default_rng([a.texture_seed, 1])
    e = 1e-3
    ring = np.append(np.exp(1j * np.linspace(0, 2 * np.pi, 8, endpoint=False)), 0) * 1.6 * a.nodule_radius
    for _ in range(20):  # 64 candidates at a time; the lungs fill ~half of the box, so one round nearly always does
        centres = rng.uniform(-a.half_width, a.half_width, 64) + 1j * rng.uniform(a.apex_y, max(a.dome_y), 64)
        pts = centres[:, None] + ring[None, :]
        px, py = pts.real, pts.imag
        ok = (_lung_fields(a, px, py, _heart(a, px, py, a.ctr_enlarged, e), e)[1] > 0.5).all(1)
        if ok.any():
            c = centres[np.argmax(ok)]
            return (float(c.real), float(c.imag))
    raise RuntimeError("no room for a nodule: the phantom's lung fields are degenerate")


def _visit_chain(rng: np.random.Generator, n: int, p: float, keep: float) -> list[bool]:
    """Presence over n visits: each visit keeps the previous state with probability `keep`, else redraws it at
    prevalence p, so every visit is marginally Bernoulli(p)."""
    state = rng.random() < p
    out = [state]
    for _ in range(n - 1):
        if rng.random() >= keep:
            state = rng.random() < p
        out.append(state)
    return out


def _sample_views(rng: np.random.Generator, cfg: PhantomConfig, n: int) -> list[View]:
    present = [_visit_chain(rng, n, p, k) for p, k in zip(cfg.prevalences, _PERSISTENCE)]
    views = []
    for v in range(n):
        views.append(View(
            angle=rng.normal(0, 0.035), scale=rng.uniform(0.94, 1.06),
            shift=(rng.normal(0, 0.015), rng.normal(0, 0.015)),
            exposure=rng.uniform(0.8, 1.25), noise=rng.uniform(0.008, 0.025),
            effusion=rng.uniform(0.015, 0.16) if present[0][v] else 0.0,
            nodule=rng.uniform(0.7, 1.3) if present[1][v] else 0.0,
            pneumothorax=rng.uniform(0.05, 0.35) if present[2][v] else 0.0,
            cardiomegaly=present[3][v],
        ))
    return views


# --------------------------------------------------------------------------------------------------- rendering

def _step(d: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of d > 0 with an edge about `width` wide (anti-aliased shapes)."""
    return np.tanh(d * (1 / width)) * 0.5 + 0.5


@lru_cache(maxsize=8)
def _interp(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear weights from n_in to n_out pixel centres (half-pixel aligned, as torch's align_corners=False)."""
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1).astype(np.float32)
    lo = np.minimum(pos.astype(int), n_in - 2)
    return lo, (pos - lo).astype(np.float32)[:, None]


def _upsample(g: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square float32 grid, elementwise (tiny BLAS products cost more on a busy machine)."""
    lo, f = _interp(size, g.shape[0])
    rows = g[lo] * (1 - f) + g[lo + 1] * f
    return rows[:, lo] * (1 - f.T) + rows[:, lo + 1] * f.T


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    return _upsample(rng.standard_normal((cells, cells), dtype=np.float32), size)


def _diaphragm(a: Anatomy, ax: np.ndarray, side: int) -> np.ndarray:
    """y of the hemidiaphragm under one lung: a dome highest at 45% of the half-width, lowest at the sides."""
    dome = a.dome_y[0 if side < 0 else 1]
    w = a.half_width
    return dome + a.dome_depth * ((ax - 0.45 * w) / (0.5 * w)) ** 2


def _pleura(a: Anatomy, x: np.ndarray, y: np.ndarray, side: int, e: float) -> np.ndarray:
    """Soft inside of one pleural cavity (before the mediastinum and heart are cut out)."""
    ax = side * x
    w = a.half_width
    dome = a.dome_y[0 if side < 0 else 1]
    t = np.clip((y - a.apex_y) / (dome - a.apex_y), 0, 1)
    lateral = w * (1 - 0.55 * (1 - t) ** 2.5)
    apex = a.apex_y + 1.1 * (ax - 0.42 * w) ** 2 / w
    # The lateral wall and apex are softer than the diaphragm: ribs and soft tissue overlap them.
    return (_step(lateral - ax, 2.5 * e) * _step(y - apex, 4 * e) * _step(_diaphragm(a, ax, side) - y, e)
            * _step(ax - 0.01, e))


def _mediastinum(a: Anatomy, x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    # Widening a little downwards; the aortic knuckle bulges to the patient's left below the clavicles.
    medi = _step(a.mediastinum + 0.04 * (y - a.apex_y) - np.abs(x - 0.008), 2 * e)
    kx, ky = a.mediastinum + 0.5 * a.knuckle - 0.004, a.apex_y + 0.13
    knuckle = _step(a.knuckle - np.sqrt((x - kx) ** 2 + ((y - ky) / 1.3) ** 2), 2 * e)
    return np.maximum(medi, knuckle)


def _heart(a: Anatomy, x: np.ndarray, y: np.ndarray, ctr: float, e: float) -> np.ndarray:
    width = ctr * 2 * a.half_width
    cx, cy = a.heart_shift, a.dome_y[1] + 0.02
    # Two thirds of the heart lie left of the midline (float32 scalars: np.where would otherwise make float64).
    half = np.where(x > cx, np.float32(0.66 * width), np.float32(0.34 * width))
    height = 0.2 + 0.3 * (width - 0.3)
    r = np.sqrt(((x - cx) / half) ** 2 + ((y - cy) / height) ** 2)
    return _step(1 - r, 6 * e)


def _lung_fields(a: Anatomy, x: np.ndarray, y: np.ndarray, heart: np.ndarray, e: float
                 ) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Both pleural cavities, each cut by the mediastinum and the heart, and their sum: the soft lung fields."""
    outside = (1 - _mediastinum(a, x, y, e)) * (1 - heart)
    pleura = {s: _pleura(a, x, y, s, e) * outside for s in (-1, 1)}
    return pleura, pleura[-1] + pleura[1]


def _ribs(a: Anatomy, x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    """Posterior ribs (leaving the spine nearly level, falling at the sides) and fainter anterior ribs (falling
    towards the sternum), as bands in a curved coordinate, each bright at its cortical edges."""
    ax = np.abs(x)
    w = a.half_width
    out = np.zeros_like(x)
    for curve, first, gain, thick in (
        (0.7 * ax * ax / w - 0.18 * ax, a.apex_y - 0.06, 1.0, 0.36),   # posterior
        (0.55 * (w - ax), a.apex_y - 0.05, 0.5, 0.45),                 # anterior
    ):
        q = (y - curve - first) / a.rib_spacing + a.rib_phase
        phase = np.log1p(0.1 * np.maximum(q, 0)) / 0.1  # interspaces widen downwards
        band = np.abs(phase - np.round(phase)) * 2  # 0 at a rib's centre, 1 midway between ribs
        inside = np.clip(1 - band / thick, 0, 1)
        rib = np.minimum(inside * 5, 1) * (0.6 + 0.4 * (1 - inside) ** 2)  # cortex brighter than the medulla
        reach = _step(w + 0.035 - ax, 3 * e) * _step(q, e) * _step(ax - 0.03, 4 * e)
        if gain < 1:  # anterior ribs end at the (invisible) costal cartilage
            reach = reach * _step(ax - 0.5 * w, 0.015)
        out += gain * rib * reach
    return out * _step(max(a.dome_y) + 0.06 - y, 0.04)  # lower ribs vanish into the abdomen


def _clavicles(a: Anatomy, x: np.ndarray, y: np.ndarray, e: float) -> np.ndarray:
    ax = np.abs(x)
    centre = a.apex_y + 0.05 - 0.3 * ax + 0.45 * (ax - 0.12) ** 2
    return (_step(0.012 + 0.01 * ax - np.abs(y - centre), e) * _step(ax - 0.03, 2 * e)
            * _step(a.half_width + 0.09 - ax, 4 * e))


def _vessels(a: Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Vascular markings: thin branches radiating from each hilum, fading towards the periphery."""
    rng = np.random.default_rng(a.texture_seed)
    hy = a.apex_y + 0.45 * (a.dome_y[0] - a.apex_y)
    out = np.zeros_like(x)
    for side in (-1, 1):
        dx, dy = x - side * (a.mediastinum + 0.025), y - hy
        r = np.sqrt(dx * dx + dy * dy)
        phi = np.arctan2(dy, side * dx)
        waves = np.zeros_like(x)
        for _ in range(5):
            n, phase, bend = rng.uniform(12, 30), rng.uniform(0, 2 * math.pi), rng.uniform(-8, 8)
            waves += np.cos(n * phi + phase + bend * r)
        lines = np.maximum(waves * (1 / math.sqrt(5)) - 0.75, 0)
        out += lines * np.exp(-r * (1 / 0.13)) + 0.5 * np.exp(-(r * (1 / 0.04)) ** 2)
    return out


def render_image(a: Anatomy, v: View, size: int, seed: int) -> np.ndarray:
    """One visit as float32 [size, size] in [0, 1].

    The anatomy is drawn at half resolution and upsampled (a ~2 px edge blur, as in a downsampled radiograph):
    4x fewer pixels keep the whole set fast. Exposure and noise are applied at full resolution. Everything stays
    float32 (Python-float constants only) because float64 transcendentals cost ~50x more here."""
    rng = np.random.default_rng(seed)
    att = _upsample(_attenuation(a, v, (size + 1) // 2, rng), size)

    # Exposure: Beer-Lambert, a smooth field (heel effect, scatter), quantum-like noise, then a display window.
    rows = np.linspace(-0.5, 0.5, size, dtype=np.float32)[:, None]
    cols = rows.T
    gx, gy, gxy = (float(g) for g in rng.normal(0, 0.05, 3))  # Python floats keep the arrays float32
    image = 1 - np.exp(np.clip(att, 0, None) * (-1.2 * v.exposure))
    image *= (1 + (0.05 + gy) * rows) * (1 + gx * cols + gxy * rows * cols)
    # Uniform noise of the same variance as Gaussian: indistinguishable here, and 4x cheaper to draw.
    noise = rng.random((size, size), dtype=np.float32) - 0.5
    image += noise * (0.4 + image) * (v.noise * math.sqrt(12))
    lo, hi = rng.uniform(0.0, 0.06), rng.uniform(0.85, 1.0)
    return np.clip((image - lo) * (1 / (hi - lo)), 0, 1)


def render_mask(a: Anatomy, v: View, size: int) -> np.ndarray:
    """The lung fields of one visit as bool [size, size], on the same grid as `render_image`."""
    x, y, e = _grid(v, (size + 1) // 2)
    heart = _heart(a, x, y, a.ctr_enlarged if v.cardiomegaly else a.ctr, e)
    return _upsample(_lung_fields(a, x, y, heart, e)[1], size) > 0.5


def _grid(v: View, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Patient-frame coordinates of an n x n grid's pixel centres after the pose jitter, and the edge width."""
    u = (np.arange(n, dtype=np.float32) + 0.5) / n
    uy, ux = np.meshgrid(u - 0.5 - v.shift[1], u - 0.5 - v.shift[0], indexing="ij")
    c, s = math.cos(v.angle), math.sin(v.angle)
    x = (c * ux + s * uy) * (1 / v.scale)
    y = (-s * ux + c * uy) * (1 / v.scale) + 0.5
    return x, y, 0.7 / n


def _attenuation(a: Anatomy, v: View, n: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation map on an n x n grid."""
    x, y, e = _grid(v, n)
    heart = _heart(a, x, y, a.ctr_enlarged if v.cardiomegaly else a.ctr, e)
    pleura, lungs = _lung_fields(a, x, y, heart, e)
    ax = np.abs(x)
    w = a.half_width

    # Soft tissue: the chord of an elliptic cylinder, widest at the bases, spreading into the shoulders and arms at
    # the top, under a neck and sloping shoulder line.
    body_w = w + 0.06 + 0.05 * np.clip(y - a.apex_y, 0, 0.5) + 0.3 * _step(0.16 - y, 0.08)
    torso = np.sqrt(np.clip(1 - (x / (body_w + 0.04)) ** 2, 0, 1)) * _step(body_w - ax, 3 * e)
    body = torso * _step(y + 0.01 - 0.3 * np.maximum(ax - 0.08, 0), 3 * e)

    depth = np.sqrt(np.clip(1 - ((ax - 0.5 * w) / (0.62 * w)) ** 2, 0.1, 1))  # lungs are thickest mid-field
    vessels = _vessels(a, x, y)
    # The heart is a little denser than the mediastinum above the diaphragm; below it merges with the abdomen.
    att = (1.1 * body - 0.85 * lungs * (0.5 + 0.5 * depth) + 0.1 * heart * _step(a.dome_y[1] - y, 0.03)
           + 0.22 * vessels * lungs)
    att += 0.04 * _smooth_field(rng, n, max(n // 6, 4)) * lungs  # parenchymal mottle
    trachea = _step(0.014 - np.abs(x - 0.006), 2 * e) * _step(a.apex_y + 0.19 - y, 4 * e)
    att -= 0.3 * trachea
    spine = _step(0.035 - ax, 3 * e) * (0.7 + 0.3 * np.cos((y - a.rib_phase) * (2 * math.pi / 0.048)) ** 2)
    att += a.bone * (0.2 * _ribs(a, x, y, e) * body + 0.3 * _clavicles(a, x, y, e) + 0.12 * spine)
    if a.breast > 0:  # a breast shadow over each lower zone with a curved lower edge
        for side in (-1, 1):
            bx, by = side * 0.62 * w, a.dome_y[0] - 0.03
            r2 = ((x - bx) / (0.2 + 0.05 * a.breast)) ** 2 + ((y - by) / 0.17) ** 2
            att += 0.2 * a.breast * np.sqrt(np.clip(1 - r2, 0, 1)) * _step(by + 0.05 - y, 0.02)

    # Air in the stomach under the left hemidiaphragm, of varying size from visit to visit.
    gr = float(rng.uniform(0.015, 0.045))
    gx, gy = 0.55 * w, _diaphragm(a, 0.55 * w, 1) + 0.8 * gr + 0.01
    att -= 0.25 * _step(1 - np.sqrt(((x - gx) / 1.5) ** 2 + (y - gy) ** 2) * (1 / gr), 0.15)

    # Findings.
    if v.effusion > 0:
        for side in a.effusion_sides:
            sax = np.clip(side * x * (1 / w), 0, 1)
            costo = float(_diaphragm(a, np.float32(w), side))
            level = costo - 0.5 * v.effusion * (1 + sax * sax)  # the meniscus climbs the lateral wall
            fluid = _step(y - level, 0.01) * pleura[side]
            att += 0.8 * fluid * (0.7 + 0.3 * _step(y - level - 0.03, 0.02))
    if v.nodule > 0:
        nx, ny = nodule_site(a)
        r2 = ((x - nx) ** 2 + (y - ny) ** 2) * (1 / (a.nodule_radius * v.nodule) ** 2)
        att += a.nodule_contrast * np.exp(-r2 * r2) * lungs
    if v.pneumothorax > 0:
        side = a.pneumothorax_side
        cx, cy = side * (a.mediastinum + 0.02), a.dome_y[0 if side < 0 else 1] - 0.02
        f = v.pneumothorax
        # Upright, the air collects at the apex and along the lateral wall: the lung shrinks towards its medial base.
        ys = np.where(y < cy, cy + (y - cy) * (1 / (1 - 0.8 * f)), y)
        collapsed = _pleura(a, cx + (x - cx) * (1 / (1 - f)), ys, side, 2 * e)
        rim = pleura[side] * (1 - collapsed)
        # The visceral pleural line, on the collapsed lung's apical and lateral edge (not along the mediastinum).
        line = pleura[side] * np.exp(-((collapsed - 0.5) * 4) ** 2) * _step(side * x - abs(cx) - 0.03, 0.01)
        att += rim * (-0.18 - 0.22 * vessels) + 0.08 * line

    return att


# ------------------------------------------------------------------------------------------------------- task

class DemoTask(Task):
    mask_names = ("lungs",)

    def __init__(self, cfg: PhantomConfig = PhantomConfig()):
        self.cfg = cfg
        self.name = "demo"
        self.skipped = []
        self.header_note = f"synthetic phantom, {cfg.size} px, 1-{cfg.max_images_per_patient} visits per patient" + (
            "; the small default, sized for a first run in minutes, with too few test patients per sex and age group "
            "for the subgroup columns (`demo:n_patients=300` draws the earlier 596-image set, which fills them)"
            if cfg == PhantomConfig() else "")
        self.anatomies: list[Anatomy] = []
        self.views: list[tuple[int, View]] = []  # (patient index, view) per image
        sex, age = [], []
        for p in range(cfg.n_patients):
            rng = np.random.default_rng([cfg.seed, p])
            a = _sample_anatomy(rng)
            n = int(rng.integers(1, cfg.max_images_per_patient + 1))
            hide_sex, hide_age = rng.random() < cfg.missing_sex, rng.random() < cfg.missing_age
            self.anatomies.append(a)
            for v in _sample_views(rng, cfg, n):
                self.views.append((p, v))
                sex.append(None if hide_sex else a.sex)
                age.append(np.nan if hide_age else round(a.age))  # whole years, as datasets report it
        self.table = TaskTable(
            image_ids=[f"demo/{i:06d}" for i in range(len(self.views))],
            patient_ids=[f"P{p:05d}" for p, _ in self.views],
            label_names=list(LABEL_NAMES),
            labels=np.array([v.labels for _, v in self.views], dtype=np.int8).reshape(-1, len(LABEL_NAMES)),
            sex=sex, age=np.array(age, dtype=float),
            split=None, has_mask=np.ones(len(self.views), dtype=bool),
        )

    def params(self, i: int) -> tuple[Anatomy, View, int]:
        """The anatomy, the view and the noise seed image `i` is drawn from."""
        p, v = self.views[i]
        return self.anatomies[p], v, int(np.random.SeedSequence([self.cfg.seed, 1 << 30, i]).generate_state(1)[0])

    def load_image(self, i: int) -> np.ndarray:
        a, v, seed = self.params(i)
        return render_image(a, v, self.cfg.size, seed)

    def load_mask(self, i: int) -> np.ndarray:
        a, v, _ = self.params(i)
        return render_mask(a, v, self.cfg.size)[None]

    def content_digest(self) -> str:
        return sha256_chunks([GENERATOR_VERSION.encode() + b"\0",
                              json.dumps(asdict(self.cfg), sort_keys=True).encode() + b"\0",
                              *(image_id.encode() + b"\0" for image_id in self.table.image_ids)])


def parse_config(arg: str | None) -> PhantomConfig:
    """``demo`` or ``demo:n_patients=50,size=128``: PhantomConfig fields as key=value pairs."""
    # Field types are the strings "int" and "float" here (postponed annotations).
    types = {f.name: float if f.type == "float" else int for f in fields(PhantomConfig)}
    return PhantomConfig(**parse_options("demo", arg, types, TaskError))


def demo(ctx: TaskContext) -> Task:
    # ctx.seed (splits, bootstraps) deliberately does not reach the data: the set is fixed unless `seed=` is given.
    return DemoTask(parse_config(ctx.arg))
