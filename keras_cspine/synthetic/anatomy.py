"""Synthetic neck anatomy for the built-in RSNA-format dataset (the paper's data, Figures 3-4).

Serves the paper's data (the RSNA 2022 cervical spine CT studies): it is the
phantom that :mod:`keras_cspine.synthetic.dataset` scans. Every structure is an approximate signed
distance function (SDF, millimetres, negative inside) evaluated in *patient* coordinates (DICOM
LPS: +x patient left, +y posterior, +z superior), so whatever the scan geometry (pixel spacing,
slice spacing, tilt, head-first or feet-first file order) the pixels, the segmentation and the
fracture boxes stay consistent with the DICOM geometry tags.

Frames: a study places a *spine frame* (origin at the C2 body centre, axes as LPS) in patient
space with a small rotation; each vertebra has its own *local frame* in the spine frame (centre on
the lordosis curve, pitched along it). Sizes follow adult anatomy (see DOMAIN.md): C1 a ring
~78 mm across with lateral masses and no body; C2 with the dens rising ~15 mm into the C1 ring;
C3-C7 with cortical shell, pedicles, laminae, processes and a ~15 mm spinal canal; T1-T3 (with
their ribs) below; ~5 mm discs.

Level cues (what a radiologist counts levels by, so that a single axial slice can be told apart
from its neighbours, as in real CT): vertebral bodies widening from ~15 mm (C3) to ~20 mm (C7),
bifid spinous processes (C2 large, C3-C5 small), C6's shorter process and C7's long one
(vertebra prominens), transverse foramina down to C6, C6's carotid tubercle
(:data:`VERTEBRA_SHAPES`); in front of the spine the mandible (C1-C3), the hyoid (C3), the
larynx with its cartilages and changing airway (thyroid cartilage C4-C5, glottis C5, cricoid
C6), the trachea with the thyroid gland and the oesophagus (C7-T1), the first ribs and the lung
apices (T1-T2) (:func:`neck_landmarks`, :func:`mandible`, :func:`hyoid`, :func:`rib_pair`).
Each is placed from the study's own vertebral levels, so it moves with the size, lordosis and
rotations of the study (the larynx with a small extra offset, as people differ).

Rendering composites tissue layers with partial-volume anti-aliasing (coverage
``clip(0.5 - d / pixel, 0, 1)``): air, fat, muscle, neck landmarks (oesophagus, thyroid gland,
airway, cartilage), lung apices, discs, then bone (cortical shell of thickness ``t`` around a
cancellous interior). A fracture is a thin slab (a crack of soft-tissue HU) cut through the
cortex and part of the cancellous bone within a sphere, with bare cancellous walls (the cortical
ring is interrupted, not lined anew), optionally with the fragment on one side displaced; its
boxes are drawn around where the fractured bone clearly differs from the intact bone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

# -- names and tissue codes --------------------------------------------------------------------
VERTEBRA_NAMES = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3")
"""Vertebrae of the phantom; label value = index + 1 (1..7 = C1..C7, 8.. = T1..)."""

TISSUES = {
    "outside_air": 0,
    "fat": 1,
    "soft_tissue": 2,
    "airway": 3,
    "lung": 4,
    "disc": 5,
    "cancellous": 6,
    "cortical": 7,
    "padding": 8,
    "cartilage": 9,
    "gland": 10,
}
"""Tissue codes of the in-memory tissue map (not written to disk; used by tests and figures)."""

HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0
HU_DISC = 80.0
HU_LUNG = -850.0
BREAK_ANY = 10.0
"""Change (HU, noise-free, bone on soft tissue) from which a pixel counts as touched by a break."""
BREAK_STRONG = 150.0
"""Change (HU) from which a pixel clearly shows the break."""
BREAK_VISIBLE = 300.0
"""Change (HU) that a slice needs somewhere to show the break to a reader (cortex or a wide gap)."""

Array = np.ndarray
Sdf = Callable[[Array, Array, Array], Array]


# -- SDF primitives (vectorised, float32; approximate distances in mm) -------------------------
def _ellipse2(x: Array, y: Array, ax: float, ay: float) -> Array:
    """Approximate signed distance to an axis-aligned ellipse (first-order, exact on the axes)."""
    px, py = x / ax, y / ay
    k0 = np.sqrt(px * px + py * py)
    k1 = np.sqrt((px / ax) ** 2 + (py / ay) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def sd_ellipsoid(x: Array, y: Array, z: Array, c, a) -> Array:
    """Ellipsoid centred at ``c`` with semi-axes ``a`` (the usual k0(k0-1)/k1 bound)."""
    px, py, pz = (x - c[0]) / a[0], (y - c[1]) / a[1], (z - c[2]) / a[2]
    k0 = np.sqrt(px * px + py * py + pz * pz)
    k1 = np.sqrt((px / a[0]) ** 2 + (py / a[1]) ** 2 + (pz / a[2]) ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _cap(d2: Array, dz: Array) -> Array:
    """Combine an in-plane distance with a height distance (an extruded 2-D shape)."""
    outside = np.sqrt(np.maximum(d2, 0.0) ** 2 + np.maximum(dz, 0.0) ** 2)
    return outside + np.minimum(np.maximum(d2, dz), 0.0)


def sd_elliptic_cylinder(x: Array, y: Array, z: Array, c, ax: float, ay: float, hz: float) -> Array:
    """Elliptic cylinder along z: centre ``c``, semi-axes ``ax``, ``ay``, half height ``hz``."""
    return _cap(_ellipse2(x - c[0], y - c[1], ax, ay), np.abs(z - c[2]) - hz)


def sd_ring(x: Array, y: Array, z: Array, c, outer, inner, hz: float) -> Array:
    """Elliptic annulus (outer minus inner ellipse) extruded along z with half height ``hz``."""
    dx, dy = x - c[0], y - c[1]
    d2 = np.maximum(_ellipse2(dx, dy, *outer), -_ellipse2(dx, dy, *inner))
    return _cap(d2, np.abs(z - c[2]) - hz)


def sd_capsule(x: Array, y: Array, z: Array, a, b, r0: float, r1: float | None = None) -> Array:
    """Capsule (a rounded cone when ``r1`` differs) from point ``a`` to point ``b``."""
    r1 = r0 if r1 is None else r1
    a = np.asarray(a, np.float32)
    ab = np.asarray(b, np.float32) - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / float(ab @ ab), 0.0, 1.0)
    qx, qy, qz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
    return np.sqrt(qx * qx + qy * qy + qz * qz) - (r0 + (r1 - r0) * t)


def smin(a: Array, b: Array, k: float = 2.0) -> Array:
    """Smooth union: bone parts blend into each other over ``k`` mm instead of meeting at a crease."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> Array:
    """Rotation matrix ``Rz @ Ry @ Rx`` from angles in degrees (columns = rotated axes)."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


# -- bony parts --------------------------------------------------------------------------------
@dataclass
class Bone:
    """A bony part in its own local frame.

    Args:
        name: "C1".."T3", or "occiput"/"mandible" (bone without a label).
        label: segmentation value (0 for unlabelled bone).
        centre: local-frame origin in the spine frame (mm).
        rot: 3x3 rotation, columns = local axes in the spine frame.
        sdf: signed distance in local coordinates.
        radius: bounding-sphere radius around ``bound`` (mm).
        cortical_hu, cancellous_hu: bone densities; shell: cortical thickness (mm).
        sites: fracture sites by kind; each returns (point, in-plane crack normal) from an rng.
        fractures: fractures applied to this bone (set by the study sampler).
        bound: local centre of the bounding sphere.
    """

    name: str
    label: int
    centre: Array
    rot: Array
    sdf: Sdf
    radius: float
    cortical_hu: float
    cancellous_hu: float
    shell: float
    sites: dict[str, Callable[[np.random.Generator], tuple[Array, Array]]] = field(
        default_factory=dict
    )
    fractures: list[Fracture] = field(default_factory=list)
    bound: Array = field(default_factory=lambda: np.zeros(3))


@dataclass
class Fracture:
    """A cortical break in a bone's local frame.

    Args:
        kind: fracture site kind (e.g. "body_anterior", "lamina", "dens", "arch").
        point: a point on the crack plane, near the bone surface (mm, local).
        normal: unit normal of the crack plane.
        gap: crack width (mm), filled with soft tissue.
        radius: the crack extends this far from ``point`` (mm).
        shift: displacement of the fragment on the +normal side (mm, local vector; zeros = none).
    """

    kind: str
    point: Array
    normal: Array
    gap: float
    radius: float
    shift: Array


def _unit(v) -> Array:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def _ring_site(rng, centre_y, ax, ay, angle_deg, z_half):
    """A point on an elliptic ring centreline and the ring tangent (the crack normal)."""
    phi = np.radians(angle_deg)
    point = np.array([ax * np.cos(phi), centre_y + ay * np.sin(phi), rng.uniform(-z_half, z_half)])
    tangent = np.array([-ax * np.sin(phi), ay * np.cos(phi), 0.0])
    normal = _unit(_unit(tangent) + np.array([0.0, 0.0, rng.uniform(-0.3, 0.3)]))
    return point, normal


# Per-level shape of C2-C7 and T1-T3 (sizes in mm at scale 1; see DOMAIN.md and standard anatomy
# atlases): body half width / half depth / half height (C3 ~15 mm wide growing to ~20 mm at C7),
# spinous process length, bifid tip (C2-C5), anterior tubercle of the transverse process (C6's
# carotid tubercle the largest), transverse foramen (C1-C6; absent at C7 and below).
VERTEBRA_SHAPES: dict[str, dict] = {
    "C2": dict(half=(8.5, 8.0, 8.5), spinous=22.0, bifid=5.5, tubercle=0.0, foramen=True),
    "C3": dict(half=(7.6, 7.1, 6.8), spinous=13.0, bifid=3.6, tubercle=2.0, foramen=True),
    "C4": dict(half=(8.0, 7.3, 6.9), spinous=14.0, bifid=3.8, tubercle=2.2, foramen=True),
    "C5": dict(half=(8.5, 7.5, 7.0), spinous=16.0, bifid=4.0, tubercle=2.4, foramen=True),
    "C6": dict(half=(9.0, 7.7, 7.1), spinous=19.0, bifid=0.0, tubercle=4.0, foramen=True),
    "C7": dict(half=(9.8, 7.9, 7.3), spinous=30.0, bifid=0.0, tubercle=0.0, foramen=False),
    "T1": dict(half=(11.0, 8.8, 8.3), spinous=28.0, bifid=0.0, tubercle=0.0, foramen=False),
    "T2": dict(half=(11.3, 9.0, 8.5), spinous=27.0, bifid=0.0, tubercle=0.0, foramen=False),
    "T3": dict(half=(11.6, 9.3, 8.7), spinous=26.0, bifid=0.0, tubercle=0.0, foramen=False),
}
"""Level-specific vertebral features, the cues a radiologist uses to tell C3-C7 apart."""


def typical_vertebra(name: str, s: float) -> tuple[Sdf, dict, float, float]:
    """C2-C7 and T1-T3: body, arch ring around the canal, pillars, processes.

    Level-specific features come from :data:`VERTEBRA_SHAPES`: body size growing from C3 to C7,
    bifid spinous processes (C2 large, C3-C5 small), C6's shorter non-bifid process, C7's long
    process ending in a tubercle (vertebra prominens), anterior tubercles of the transverse
    processes (C6: the prominent carotid tubercle) and transverse foramina down to C6.

    Returns (sdf, fracture sites, body half height, bounding radius); ``s`` is the size scale.
    """
    level = VERTEBRA_NAMES.index(name)
    thoracic = name.startswith("T")
    shape = VERTEBRA_SHAPES[name]
    ax, ay, hh = (s * v for v in shape["half"])  # body half width, half depth, half height
    cxh = s * (11.5 if not thoracic else 9.0)  # canal half width
    cyh = s * (7.5 if not thoracic else 7.0)  # canal half depth (AP ~15 mm)
    yc = ay + cyh  # canal centre, behind the body
    th = s * 3.6  # arch thickness
    ah = s * 4.8  # arch half height
    spinous = s * shape["spinous"]
    droop = 0.55 if thoracic else 0.3
    sp_a = np.array([0.0, yc + cyh + th * 0.5, -s * 1.0])
    sp_b = sp_a + np.array([0.0, spinous, -spinous * droop])
    bifid = s * shape["bifid"]
    sp_tip_r = s * (3.0 if name == "C7" else 2.6 if thoracic or name == "C6" else 2.2)
    tp_len = s * (20.0 if thoracic else 13.0 if level < 6 else 15.0)
    tp_a = np.array([ax * 0.75, ay * 0.35 if not thoracic else yc, 0.0])
    tp_b = tp_a + np.array([tp_len, s * (10.0 if thoracic else 3.0), -s * 1.0])
    foramen = shape["foramen"]
    tubercle = s * shape["tubercle"]
    pillar_x = cxh + th * 0.7

    def sdf(x, y, z):
        body = sd_elliptic_cylinder(x, y, z, (0.0, 0.0, 0.0), ax, ay, hh)
        arch = sd_ring(x, y, z, (0.0, yc, -s * 0.5), (cxh + th, cyh + th), (cxh, cyh), ah)
        d = smin(body, arch, 2.0)
        for sign in (-1.0, 1.0):
            pillar = sd_ellipsoid(
                x, y, z, (sign * pillar_x, yc - s * 0.5, -s * 0.5), (s * 4.6, s * 6.0, hh + s * 0.6)
            )
            d = smin(d, pillar, 2.0)
            tp = sd_capsule(
                x, y, z, (sign * tp_a[0], tp_a[1], tp_a[2]), (sign * tp_b[0], tp_b[1], tp_b[2]),
                s * 3.2, s * 2.4,
            )  # fmt: skip
            if tubercle:  # anterior tubercle at the front of the transverse process
                tub = sd_ellipsoid(x, y, z, (sign * (tp_b[0] - s * 1.5), tp_a[1] - s * 3.5, 0.0),
                                   (tubercle, tubercle * 0.9, tubercle * 1.1))  # fmt: skip
                tp = smin(tp, tub, 1.5)
            if foramen:  # transverse foramen for the vertebral artery
                hole = _ellipse2(x - sign * (ax + s * 5.5), y - tp_a[1] - s * 0.8, s * 2.6, s * 2.6)
                tp = np.maximum(tp, -hole)
            d = smin(d, tp, 1.5)
            if bifid:  # two diverging tips of a bifid spinous process
                tip = sp_b + np.array([sign * bifid, s * 3.0, -s * 1.0])
                d = smin(d, sd_capsule(x, y, z, sp_b, tip, sp_tip_r, s * 1.8), 1.0)
        d = smin(d, sd_capsule(x, y, z, sp_a, sp_b, s * 3.2, sp_tip_r), 2.0)
        if name == "C7":  # vertebra prominens: the long process ends in a tubercle
            d = smin(d, sd_ellipsoid(x, y, z, sp_b, (s * 3.6, s * 3.2, s * 3.4)), 1.0)
        if name == "C2":  # the dens rises ~15 mm into the C1 ring
            dens = sd_capsule(x, y, z, (0.0, -s, hh - s * 3.0), (0.0, -s, hh + s * 14.0), s * 5.0,
                              s * 4.2)  # fmt: skip
            d = smin(d, dens, 2.0)
        canal = _ellipse2(x, y - yc, cxh, cyh)
        return np.maximum(d, -canal)

    def body_anterior(r):
        p = np.array([r.uniform(-0.5, 0.5) * ax, -ay, r.uniform(-0.55, 0.55) * hh])
        return p, _unit([1.0, r.uniform(-0.3, 0.3), r.uniform(-0.4, 0.4)])

    def body_lateral(r):
        side = r.choice([-1.0, 1.0])
        p = np.array([side * ax, r.uniform(-0.5, 0.4) * ay, r.uniform(-0.55, 0.55) * hh])
        return p, _unit([r.uniform(-0.3, 0.3), 1.0, r.uniform(-0.4, 0.4)])

    def lamina(r):
        angle = 90.0 + r.choice([-1.0, 1.0]) * r.uniform(25.0, 60.0)
        return _ring_site(r, yc, cxh + th / 2, cyh + th / 2, angle, ah * 0.5)

    def pedicle(r):
        angle = r.choice([-1.0, 1.0]) * r.uniform(-25.0, 5.0) + r.choice([0.0, 180.0])
        return _ring_site(r, yc, cxh + th / 2, cyh + th / 2, angle, ah * 0.5)

    def spinous_site(r):
        p = sp_a + r.uniform(0.25, 0.75) * (sp_b - sp_a)
        return p, _unit(_unit(sp_b - sp_a) + np.array([r.uniform(-0.3, 0.3), 0.0, 0.0]))

    sites = {"body_anterior": body_anterior, "body_lateral": body_lateral, "lamina": lamina,
             "pedicle": pedicle}  # fmt: skip
    if name == "C2":

        def dens(r):
            p = np.array([0.0, -s, hh + s * r.uniform(1.0, 8.0)])
            return p, _unit([r.uniform(-1, 1), r.uniform(-1, 1), r.uniform(-0.4, 0.4)])

        sites["dens"] = dens
    if level >= 5:  # clay-shoveler's fractures of C6/C7/T1..
        sites["spinous"] = spinous_site
    reach = [np.linalg.norm(sp_b) + bifid + s * 6.0, np.linalg.norm(tp_b) + s * 4.0,
             np.hypot(ax, hh),
             hh + s * 18.5]  # fmt: skip
    return sdf, sites, hh, float(max(reach)) + 1.0


def atlas(s: float) -> tuple[Sdf, dict]:
    """C1: a ring (anterior and posterior arches), lateral masses, transverse processes; no body.

    Local origin at the ring centre; the dens of C2 sits at (0, -10 s) just behind the anterior arch.
    """
    ox, oy, thick, hz = s * 22.0, s * 21.0, s * 5.0, s * 5.0
    tp_x = s * 36.5

    def sdf(x, y, z):
        d = sd_ring(x, y, z, (0.0, 0.0, 0.0), (ox, oy), (ox - thick, oy - thick), hz)
        d = smin(d, sd_ellipsoid(x, y, z, (0.0, -oy + s, 0.0), (s * 5.0, s * 3.0, s * 6.0)), 1.5)
        d = smin(d, sd_ellipsoid(x, y, z, (0.0, oy - s, -s), (s * 5.0, s * 3.5, s * 4.5)), 1.5)
        for sign in (-1.0, 1.0):
            mass = sd_ellipsoid(x, y, z, (sign * s * 13.5, -s * 4.0, 0.0), (s * 7, s * 10, s * 8))
            d = smin(d, mass, 2.0)
            tp = sd_capsule(x, y, z, (sign * s * 17, -s * 3, 0.0), (sign * tp_x, -s, -s), s * 4.5,
                            s * 3.5)  # fmt: skip
            hole = _ellipse2(x - sign * s * 24.0, y + s * 3.0, s * 2.8, s * 2.8)
            d = smin(d, np.maximum(tp, -hole), 1.5)
        return d

    def arch(r):
        base = -90.0 if r.random() < 0.5 else 90.0
        angle = base + r.choice([-1.0, 1.0]) * r.uniform(12.0, 40.0)
        return _ring_site(r, 0.0, ox - thick / 2, oy - thick / 2, angle, hz * 0.5)

    def lateral_mass(r):
        side = r.choice([-1.0, 1.0])
        p = np.array([side * s * 6.5, -s * 4.0 + r.uniform(-4, 4) * s, r.uniform(-4, 4) * s])
        return p, _unit([r.uniform(-0.2, 0.2), 1.0, r.uniform(-0.3, 0.3)])

    return sdf, {"arch": arch, "lateral_mass": lateral_mass}


def occiput(s: float) -> Sdf:
    """Skull base hint above C1 (local frame = C1's): occipital bowl with the foramen magnum,
    occipital condyles resting on the C1 lateral masses, mastoid processes."""
    outer = (s * 62.0, s * 76.0, s * 52.0)
    inner = (outer[0] - s * 6.0, outer[1] - s * 6.0, outer[2] - s * 6.0)
    c = (0.0, s * 12.0, s * 62.0)

    def sdf(x, y, z):
        d = np.maximum(sd_ellipsoid(x, y, z, c, outer), -sd_ellipsoid(x, y, z, c, inner))
        d = np.maximum(d, -_ellipse2(x, y - s * 6.0, s * 15.0, s * 18.0))  # foramen magnum
        for sign in (-1.0, 1.0):
            condyle = sd_ellipsoid(x, y, z, (sign * s * 13.0, -s * 4.0, s * 13.5), (6 * s, 9 * s, 4 * s))
            d = smin(d, condyle, 2.0)
            mastoid = sd_ellipsoid(x, y, z, (sign * s * 46, s * 6, s * 20), (8 * s, 10 * s, 13 * s))
            d = np.minimum(d, mastoid)
        return d

    return sdf


# -- the neck ----------------------------------------------------------------------------------
@dataclass
class Structure:
    """A soft-tissue landmark of the neck, placed relative to the airway.

    ``sdf(x, v, z)`` takes spine-frame x and z and ``v = y - air_y(z)`` (y relative to the
    airway centre at that height); ``z_range`` bounds it in spine-frame z (for speed).
    """

    name: str
    sdf: Sdf
    hu: float
    code: int
    z_range: tuple[float, float]


@dataclass
class Neck:
    """Soft tissue in the spine frame: a z-dependent ellipse (head above, shoulders below) with a
    fat layer, the floor of the mouth and chin in front of the upper neck (``face``), then the
    landmarks (``structures``, composited in order: oesophagus, thyroid gland, the airway whose
    shape changes with the level, laryngeal cartilages) and the lung apices low down.
    The outline profiles are piecewise linear in spine-frame z (``np.interp`` over ``z_keys``)."""

    z_keys: Array  # increasing spine-frame z
    centre_y: Array
    half_x: Array
    half_y: Array
    fat: float
    face: Sdf
    structures: list[Structure]
    air_y: Callable[[Array], Array]  # airway centre (spine-frame y) at spine-frame heights
    lungs: tuple  # ((centre, semi-axes), ...)
    spine_y: Array  # lordosis y at z_keys

    def evaluate(self, x: Array, y: Array, z: Array, pixel: float, hu: Array, tissue: Array) -> None:
        """Composite fat, muscle, landmarks and lungs onto ``hu``/``tissue`` (in place)."""
        flat = z.ravel()

        def prof(values):
            return np.interp(flat, self.z_keys, values).reshape(z.shape).astype(np.float32)

        cy, hx, hy = prof(self.centre_y), prof(self.half_x), prof(self.half_y)
        d_face = self.face(x, y, z)
        d_skin = np.minimum(_ellipse2(x, y - cy, hx, hy), d_face)
        _layer(hu, tissue, d_skin, pixel, HU_FAT, TISSUES["fat"])
        d_muscle = np.minimum(_ellipse2(x, y - cy, hx - self.fat, hy - self.fat), d_face + self.fat)
        _layer(hu, tissue, d_muscle, pixel, HU_SOFT, TISSUES["soft_tissue"])
        v = y - self.air_y(z)
        z_lo, z_hi = z.reshape(len(z), -1).min(axis=1), z.reshape(len(z), -1).max(axis=1)
        for st in self.structures:  # only on the slices that its height range reaches
            near = np.nonzero((z_hi >= st.z_range[0] - pixel) & (z_lo <= st.z_range[1] + pixel))[0]
            if len(near) == 0:
                continue
            sl = slice(int(near[0]), int(near[-1]) + 1)
            h, t = hu[sl], tissue[sl]
            _layer(h, t, st.sdf(x[sl], v[sl], z[sl]), pixel, st.hu, st.code)
            hu[sl], tissue[sl] = h, t
        for centre, axes in self.lungs:
            _layer(hu, tissue, sd_ellipsoid(x, y, z, centre, axes), pixel, HU_LUNG, TISSUES["lung"])


def _segment2(x: Array, y: Array, a, b) -> Array:
    """Unsigned distance to the 2-D segment from ``a`` to ``b`` (in-plane)."""
    ab = np.array(b, float) - np.array(a, float)
    px, py = x - a[0], y - a[1]
    t = np.clip((px * ab[0] + py * ab[1]) / float(ab @ ab), 0.0, 1.0)
    return np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2)


def _triangle2(x: Array, y: Array, p0, p1, p2) -> Array:
    """Signed distance to a 2-D triangle (exact; negative inside)."""
    d = np.minimum(np.minimum(_segment2(x, y, p0, p1), _segment2(x, y, p1, p2)),
                   _segment2(x, y, p2, p0))  # fmt: skip

    def side(a, b):
        return (b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0])

    s0, s1, s2 = side(p0, p1), side(p1, p2), side(p2, p0)
    inside = ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
    return np.where(inside, -d, d)


def _band(d2: Array, z: Array, z_lo: float, z_hi: float) -> Array:
    """A 2-D shape extruded between spine-frame heights ``z_lo`` and ``z_hi``."""
    return _cap(d2, np.abs(z - (z_lo + z_hi) / 2) - (z_hi - z_lo) / 2)


@dataclass(frozen=True)
class Levels:
    """Spine-frame heights of the vertebral levels of one study.

    ``at(name, f)``: f = 0 the body centre, +1 the middle of the disc above, -1 that of the disc
    below (C1: its ring centre, same span as C2's).
    """

    centres: dict  # name -> spine-frame z of the body centre
    half: dict  # name -> body half height
    disc: float

    def at(self, name: str, f: float) -> float:
        return float(self.centres[name] + f * (self.half[name] + self.disc / 2))


def neck_landmarks(rng: np.random.Generator, s: float, lv: Levels, curve_y: Callable,
                   z_bottom: float, z_top: float) -> tuple[list[Structure], Callable]:  # fmt: skip
    """The soft-tissue landmarks a radiologist counts levels by, each at its vertebral level.

    - Airway (tissue "airway"): oro/hypopharynx (a wide transverse ellipse) down to C4; the supraglottic larynx
      (triangular, apex anterior) with the piriform sinuses beside it at C4-C5; the glottis (a
      narrow slit) at C5; the round subglottic airway inside the cricoid at C6; the trachea
      (round, flat behind) from C7 down.
    - Cartilages (~+150..+400 HU, partly calcified): the thyroid cartilage (a V, the laryngeal
      prominence in front) at C4-C5, the arytenoids at C5, the cricoid ring at C6 (its posterior
      lamina reaching up to C5).
    - The thyroid gland (~+100 HU): lobes on both sides of the trachea at C6-T1 and the isthmus in
      front of it at C7-T1; the oesophagus (with a fat plane) behind the trachea from C6 down.

    The whole larynx moves by a small per-study offset (people differ by a fraction of a level).
    Returns the structures and the airway centre ``air_y(z)`` (spine-frame y).
    """
    jitter = float(rng.normal(0.0, 1.5)) * s
    at = lambda name, f: lv.at(name, f) + jitter  # noqa: E731
    keys_z = [z_bottom, at("C7", 0), at("C6", 0), at("C5", 0), at("C4", 0), at("C3", 0),
              lv.at("C2", 0), z_top]  # fmt: skip
    keys_dy = s * np.array([-30.0, -28.0, -26.0, -24.5, -23.0, -19.0, -16.0, -16.0])
    keys_z, keys_dy = np.array(keys_z), np.asarray(keys_dy)

    def air_y(z):
        flat = z.ravel()
        return (np.interp(flat, keys_z, keys_dy) + curve_y(flat)).reshape(z.shape).astype(np.float32)

    hu_cart = float(rng.uniform(150.0, 400.0))
    hu_gland = float(rng.uniform(90.0, 130.0))
    trachea_r = s * rng.uniform(7.5, 9.0)
    air_top = lv.at("C1", 0.0) + s * 18.0

    def extruded(shape2d, z_lo, z_hi):
        return lambda x, v, z: _band(shape2d(x, v), z, z_lo, z_hi)

    def trachea(x, v):  # round, flattened behind (the membranous wall)
        return np.maximum(_ellipse2(x, v, trachea_r, trachea_r * 0.9), v - trachea_r * 0.6)

    def piriform(x, v):
        return np.minimum(_ellipse2(x - s * 13.0, v - s * 5.0, s * 3.0, s * 4.0),
                          _ellipse2(x + s * 13.0, v - s * 5.0, s * 3.0, s * 4.0))  # fmt: skip

    airway = [  # (name, 2-D shape, bottom, top), from the trachea up to the nasopharynx
        ("trachea", trachea, z_bottom - 50.0, at("C6", -0.4)),
        ("subglottis", lambda x, v: _ellipse2(x, v, s * 7.0, s * 7.0), at("C6", -0.45),
         at("C5", -0.6)),
        ("glottis", lambda x, v: _triangle2(x, v, (0, -s * 8.0), (s * 3.0, s * 6.0),
                                            (-s * 3.0, s * 6.0)), at("C5", -0.65), at("C5", 0.15)),
        ("vestibule", lambda x, v: _triangle2(x, v, (0, -s * 9.0), (s * 10.0, s * 6.0),
                                              (-s * 10.0, s * 6.0)), at("C5", 0.1), at("C4", 0.75)),
        ("piriform_sinuses", piriform, at("C5", -0.3), at("C4", 0.75)),
        ("pharynx", lambda x, v: _ellipse2(x, v, s * 13.0, s * 5.5), at("C4", 0.7), air_top),
    ]  # fmt: skip

    def thyroid_cartilage(x, v, z):
        apex = (0.0, -s * 13.0)
        vee = np.minimum(_segment2(x, v, apex, (s * 19.0, s * 6.0)),
                         _segment2(x, v, apex, (-s * 19.0, s * 6.0))) - s * 1.4  # fmt: skip
        return _band(vee, z, at("C5", -0.3), at("C4", 0.6))

    def arytenoids(x, v, z):
        pair = np.minimum(_ellipse2(x - s * 5.0, v - s * 8.5, s * 2.6, s * 3.0),
                          _ellipse2(x + s * 5.0, v - s * 8.5, s * 2.6, s * 3.0))  # fmt: skip
        return _band(pair, z, at("C5", -0.2), at("C5", 0.5))

    def cricoid(x, v, z):
        ring = np.maximum(_ellipse2(x, v, s * 10.5, s * 10.5), -_ellipse2(x, v, s * 7.8, s * 7.8))
        arch = _band(ring, z, at("C6", -0.5), at("C6", 0.25))
        lamina = _band(np.maximum(ring, s * 2.0 - v), z, at("C6", -0.5), at("C5", -0.35))
        return np.minimum(arch, lamina)

    def gland(x, v, z):
        zc = at("C7", 0.1)
        lobes = np.minimum(
            sd_ellipsoid(x, v, z, (s * 14.5, -s * 1.5, zc), (s * 6.5, s * 9.0, s * 19.0)),
            sd_ellipsoid(x, v, z, (-s * 14.5, -s * 1.5, zc), (s * 6.5, s * 9.0, s * 19.0)),
        )
        isthmus = _band(_segment2(x, v, (-s * 12.0, -s * 9.5), (s * 12.0, -s * 9.5)) - s * 2.8, z,
                        at("T1", 0.5), at("C7", 0.2))  # fmt: skip
        return np.minimum(lobes, isthmus)

    oes_x = s * rng.uniform(0.0, 4.0)  # slightly to the left, as usual

    def oesophagus_fat(x, v, z):
        v = v - trachea_r - s * 5.0
        return _band(_ellipse2(x - oes_x, v, s * 9.5, s * 6.0), z, z_bottom - 50.0, at("C6", 0.1))

    def oesophagus(x, v, z):
        v = v - trachea_r - s * 5.0
        return _band(_ellipse2(x - oes_x, v, s * 7.5, s * 4.2), z, z_bottom - 50.0, at("C6", 0.1))

    low = z_bottom - 50.0
    structures = [
        Structure("oesophagus_fat", oesophagus_fat, HU_FAT, TISSUES["fat"], (low, at("C6", 0.1))),
        Structure("oesophagus", oesophagus, 45.0, TISSUES["soft_tissue"], (low, at("C6", 0.1))),
        Structure("thyroid_gland", gland, hu_gland, TISSUES["gland"],
                  (at("C7", 0.1) - s * 19.0, at("C7", 0.1) + s * 19.0)),
        *(Structure(name, extruded(shape, lo, hi), HU_AIR, TISSUES["airway"], (lo, hi))
          for name, shape, lo, hi in airway),
        Structure("thyroid_cartilage", thyroid_cartilage, hu_cart, TISSUES["cartilage"],
                  (at("C5", -0.3), at("C4", 0.6))),
        Structure("arytenoids", arytenoids, hu_cart, TISSUES["cartilage"],
                  (at("C5", -0.2), at("C5", 0.5))),
        Structure("cricoid", cricoid, hu_cart, TISSUES["cartilage"],
                  (at("C6", -0.5), at("C5", -0.35))),
    ]  # fmt: skip
    return structures, air_y


def mandible(s: float) -> tuple[Sdf, Array, float]:
    """The mandible (local origin: middle of its lower border, spine-frame axes): a U-shaped
    cortical arch in front (open behind) ~26 mm tall, and the two rami rising from its ends
    towards the skull base. In axial slices: two bars beside the pharynx at C1, the U at C2-C3.
    Returns (sdf, bounding centre, bounding radius)."""
    hb = s * 13.0

    def sdf(x, y, z):
        ring = np.maximum(_ellipse2(x, y, s * 40.0, s * 36.0), -_ellipse2(x, y, s * 32.0, s * 28.0))
        body = _cap(np.maximum(ring, y - s * 8.0), np.abs(z - hb) - hb)
        d = body
        for sign in (-1.0, 1.0):
            ramus = sd_elliptic_cylinder(x, y, z, (sign * s * 37.0, s * 8.0, s * 32.0), s * 3.5,
                                         s * 12.0, s * 22.0)  # fmt: skip
            d = smin(d, ramus, 2.0)
        return d

    return sdf, np.array([0.0, 0.0, s * 26.0]), s * 62.0


def hyoid(s: float) -> tuple[Sdf, Array, float]:
    """The hyoid bone at C3 (local origin: centre of its U): a thin U-shaped bone, body in
    front, greater horns running back beside the pharynx."""

    def sdf(x, y, z):
        ring = np.maximum(_ellipse2(x, y, s * 20.0, s * 17.0), -_ellipse2(x, y, s * 16.8, s * 13.8))
        return _cap(np.maximum(ring, y - s * 12.0), np.abs(z) - s * 4.0)

    return sdf, np.zeros(3), s * 28.0


def rib_pair(name: str, s: float) -> tuple[Sdf, Array, float]:
    """The ribs of T1..T3 (local frame = the vertebra's): from the transverse process tip,
    curving laterally, then forwards and down (the first rib short and steep)."""
    k = int(name[1]) - 1
    pts = np.array([[26, 22, 0], [40 + 4 * k, 25 + 2 * k, -4], [52 + 6 * k, 8, -14 - 3 * k],
                    [50 + 9 * k, -16, -26 - 5 * k], [38 + 12 * k, -36, -36 - 6 * k]], float) * s
    radius = s * (3.6 - 0.3 * k)

    def sdf(x, y, z):
        d = None
        for sign in (-1.0, 1.0):
            p = pts * np.array([sign, 1.0, 1.0])
            for a, b in zip(p[:-1], p[1:]):
                c = sd_capsule(x, y, z, a, b, radius)
                d = c if d is None else np.minimum(d, c)
        return d

    return sdf, np.array([0.0, 0.0, -s * 18.0]), s * (80.0 + 10 * k)


def _layer(hu: Array, tissue: Array, d: Array, pixel: float, value: float, code: int) -> Array:
    """Partial-volume composite of a tissue of HU ``value`` where ``d < 0``; returns coverage."""
    alpha = np.clip(0.5 - d / pixel, 0.0, 1.0)
    hu += alpha * (value - hu)
    tissue[d < 0] = code
    return alpha


# -- the whole phantom -------------------------------------------------------------------------
@dataclass
class Anatomy:
    """One study's phantom: bones (vertebrae and unlabelled bone), discs, neck; placed in patient
    space by ``origin`` (spine-frame origin, LPS mm) and ``rot`` (spine frame -> LPS)."""

    origin: Array
    rot: Array
    bones: list[Bone]
    discs: list[tuple[Array, Array, float, float, float]]  # centre, rot, ax, ay, half height
    neck: Neck
    disc_hu: float
    extents: dict[str, tuple[float, float]]  # vertebra -> spine-frame z (bottom, top) of body/ring

    def vertebra(self, name: str) -> Bone:
        return next(b for b in self.bones if b.name == name)

    def world(self, spine_point) -> Array:
        """Spine-frame point -> patient LPS."""
        return self.origin + self.rot @ np.asarray(spine_point, float)

    def bone_world(self, bone: Bone, local_point) -> Array:
        """Bone-local point -> patient LPS."""
        return self.world(bone.centre + bone.rot @ np.asarray(local_point, float))


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Sample one study's phantom: size, lordosis, rotations, densities and soft tissue."""
    s = float(rng.uniform(0.9, 1.1))
    lordosis = rng.uniform(0.0, 12.0)  # mm, mid-cervical bodies move anterior (-y)
    disc = s * rng.uniform(4.5, 5.8)
    bones: list[Bone] = []
    centres: dict[str, Array] = {}
    half: dict[str, float] = {}
    shapes = {}
    z = 0.0
    for i, name in enumerate(VERTEBRA_NAMES[1:], start=1):
        sdf, sites, hh, radius = typical_vertebra(name, s)
        if i > 1:
            z -= half[VERTEBRA_NAMES[i - 1]] + disc + hh
        half[name], shapes[name] = hh, (sdf, sites, radius)
        centres[name] = np.array([0.0, 0.0, z])
    z_t1 = centres["T1"][2]

    def curve_y(zz):
        u = np.clip(zz / z_t1, 0.0, 1.0)
        return -lordosis * np.sin(np.pi * u)

    def curve_angle(zz):  # pitch (deg about x) that aligns local z with the curve tangent
        dy = (curve_y(zz - 0.5) - curve_y(zz + 0.5)) / 1.0
        return float(np.degrees(np.arctan2(dy, 1.0)))

    cortical = rng.uniform(1000.0, 1800.0)
    for name in VERTEBRA_NAMES[1:]:
        c = centres[name]
        c[1] = curve_y(c[2])
        rot = rotation(rx=curve_angle(c[2]) + rng.normal(0, 1.5), rz=rng.normal(0.0, 2.0))
        sdf, sites, radius = shapes[name]
        bones.append(Bone(name, VERTEBRA_NAMES.index(name) + 1, c, rot, sdf, radius,
                          float(np.clip(cortical + rng.normal(0, 80), 900, 1900)),
                          rng.uniform(200.0, 400.0), s * rng.uniform(1.2, 1.7), sites))  # fmt: skip
    # C1 rests on C2 with the dens inside its ring.
    c2 = centres["C2"]
    c1_centre = c2 + np.array([0.0, s * 9.0, half["C2"] + s * 9.5])
    c1_rot = rotation(rx=rng.normal(0.0, 3.0), rz=rng.normal(0.0, 2.0))
    c1_sdf, c1_sites = atlas(s)
    bones.insert(0, Bone("C1", 1, c1_centre, c1_rot, c1_sdf, s * 44.0, cortical,
                         rng.uniform(200.0, 400.0), s * rng.uniform(1.2, 1.7), c1_sites))  # fmt: skip
    # Unlabelled bone: the skull base above C1 (bounded by a sphere around its lower part).
    occ = Bone("occiput", 0, c1_centre.copy(), c1_rot, occiput(s), s * 80.0, cortical, 300.0,
               s * 2.0, bound=np.array([0.0, s * 12.0, s * 62.0]))  # fmt: skip
    bones = [occ, *bones]

    discs = []
    names = VERTEBRA_NAMES[1:]
    for upper, lower in zip(names[:-1], names[1:]):
        bu = next(b for b in bones if b.name == upper)
        bl = next(b for b in bones if b.name == lower)
        top = bu.centre - bu.rot[:, 2] * half[upper]
        bottom = bl.centre + bl.rot[:, 2] * half[lower]
        mid = (top + bottom) / 2
        axis = _unit(top - bottom)
        rot = rotation(rx=float(np.degrees(np.arctan2(-axis[1], axis[2]))))
        (wu, du, _), (wl, dl, _) = VERTEBRA_SHAPES[upper]["half"], VERTEBRA_SHAPES[lower]["half"]
        discs.append((mid, rot, s * (wu + wl) / 2 - 0.3, s * (du + dl) / 2 - 0.2,
                      float(np.linalg.norm(top - bottom)) / 2 + 0.6))  # fmt: skip

    extents = {"C1": (c1_centre[2] - s * 8.0, c1_centre[2] + s * 6.0)}
    for name in names:
        top = centres[name][2] + half[name] + (s * 14.0 if name == "C2" else 0.0)
        extents[name] = (centres[name][2] - half[name], top)
    levels = Levels({"C1": float(c1_centre[2]), **{n: float(c[2]) for n, c in centres.items()}},
                    {"C1": half["C2"], **half}, disc)  # fmt: skip

    # Unlabelled landmark bones: mandible (C1-C3), hyoid (C3), first ribs (T1-T3).
    z_jaw = levels.at("C2", -0.9) + s * rng.uniform(-4.0, 4.0)
    jaw_sdf, jaw_bound, jaw_radius = mandible(s)
    jaw_centre = np.array([0.0, float(curve_y(z_jaw)) - s * 22.0, z_jaw])
    bones.append(Bone("mandible", 0, jaw_centre, rotation(rx=rng.normal(0.0, 4.0)), jaw_sdf,
                      jaw_radius, float(rng.uniform(1400.0, 1900.0)), rng.uniform(300.0, 450.0),
                      s * 2.2, bound=jaw_bound))  # fmt: skip

    # Neck: profiles over spine-frame z.
    c1_top, c7 = extents["C1"][1], centres["C7"][2]
    z_keys = np.array([c7 - 120, centres["T1"][2], c7, c1_top - 5, c1_top + 30, c1_top + 200])
    spine_y = curve_y(z_keys)
    hx0, hy0 = rng.uniform(50.0, 64.0) * s, rng.uniform(52.0, 62.0) * s
    half_x = np.array([hx0 + 65, hx0 + 45, hx0, hx0, hx0 + 14, hx0 + 14])
    half_y = np.array([hy0 + 12, hy0 + 8, hy0, hy0, hy0 + 22, hy0 + 22])
    centre_y = spine_y + s * 8.0 + np.array([0, 0, 0, 0, 8, 8])
    face_c = (0.0, float(curve_y(z_jaw)) - s * 28.0, z_jaw + s * 20.0)
    face_a = (hx0 * 0.85, s * 42.0, s * 48.0)

    def face(x, y, z):  # floor of the mouth, chin and submandibular region
        return sd_ellipsoid(x, y, z, face_c, face_a)

    structures, air_y = neck_landmarks(rng, s, levels, curve_y, float(z_keys[0]),
                                       float(z_keys[-1]))  # fmt: skip
    z_hy = levels.at("C3", 0.1) + float(rng.normal(0.0, 1.5)) * s
    hy_sdf, hy_bound, hy_radius = hyoid(s)
    hy_centre = np.array([0.0, float(air_y(np.array([z_hy]))[0]) - s * 3.0, z_hy])
    bones.append(Bone("hyoid", 0, hy_centre, rotation(rx=rng.normal(0.0, 5.0)), hy_sdf, hy_radius,
                      float(rng.uniform(700.0, 1100.0)), rng.uniform(200.0, 300.0), s * 1.0,
                      bound=hy_bound))  # fmt: skip
    for name in ("T1", "T2", "T3"):
        vb = next(b for b in bones if b.name == name)
        rib_sdf, rib_bound, rib_radius = rib_pair(name, s)
        bones.append(Bone(f"ribs_{name}", 0, vb.centre.copy(), vb.rot, rib_sdf, rib_radius,
                          vb.cortical_hu * 0.9, vb.cancellous_hu, s * 1.2, bound=rib_bound))  # fmt: skip
    t2 = centres["T2"][2]
    lungs = tuple(
        ((sign * s * 48.0, float(centres["T2"][1]) + s * 8.0, float(t2) - s * 30.0),
         (s * 32, s * 40, s * 48))
        for sign in (-1.0, 1.0)
    )  # fmt: skip
    neck = Neck(z_keys, centre_y, half_x, half_y, s * rng.uniform(3.0, 10.0), face, structures,
                air_y, lungs, spine_y)  # fmt: skip
    # Patient placement: small global rotations, arbitrary table offsets.
    rot = rotation(rx=rng.uniform(-6, 6), ry=rng.uniform(-4, 4), rz=rng.uniform(-8, 8))
    origin = np.array([rng.uniform(-15, 15), rng.uniform(-10, 30), rng.uniform(-250.0, 50.0)])
    return Anatomy(origin, rot, bones, discs, neck, float(rng.uniform(70.0, 95.0)), extents)


# -- rendering onto a slice grid ---------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    """A slice grid in patient space: pixel (s, r, c) -> ipps[s] + c*dc*row_dir + r*dr*col_dir.

    ``row_dir`` is the direction of increasing column index (IOP[0:3]), ``col_dir`` that of
    increasing row index (IOP[3:6]); ``ipps`` are the slices' ImagePositionPatient in series order.
    """

    ipps: Array  # (Z, 3)
    row_dir: Array
    col_dir: Array
    dr: float
    dc: float
    rows: int
    columns: int

    @property
    def normal(self) -> Array:
        return _unit(np.cross(self.row_dir, self.col_dir))


def _local_coords(grid: Grid, s_idx: Array, r_idx: Array, c_idx: Array, origin: Array, m: Array):
    """Coordinates ``m @ (p - origin)`` of the pixels of a sub-grid, as three float32 arrays."""
    base = (grid.ipps[s_idx] - origin) @ m.T  # (ns, 3)
    step_r = m @ (grid.col_dir * grid.dr)
    step_c = m @ (grid.row_dir * grid.dc)
    out = []
    for k in range(3):
        out.append(
            (
                base[:, k][:, None, None]
                + (r_idx * step_r[k])[None, :, None]
                + (c_idx * step_c[k])[None, None, :]
            ).astype(np.float32)
        )
    return out


def _window(grid: Grid, s0: int, s1: int, centre_world: Array, radius: float):
    """Slice, row and column index ranges of the part of the chunk within ``radius`` of a point."""
    n = grid.normal
    pos = grid.ipps[s0:s1] @ n
    c_pos = centre_world @ n
    s_sel = np.nonzero(np.abs(pos - c_pos) <= radius)[0] + s0
    rel = centre_world - grid.ipps[0]
    ci, ri = rel @ grid.row_dir / grid.dc, rel @ grid.col_dir / grid.dr
    rc, rr = radius / grid.dc, radius / grid.dr
    c_lo, c_hi = max(int(np.floor(ci - rc)), 0), min(int(np.ceil(ci + rc)) + 1, grid.columns)
    r_lo, r_hi = max(int(np.floor(ri - rr)), 0), min(int(np.ceil(ri + rr)) + 1, grid.rows)
    if len(s_sel) == 0 or c_lo >= c_hi or r_lo >= r_hi:
        return None
    return s_sel, np.arange(r_lo, r_hi), np.arange(c_lo, c_hi)


def render_chunk(anatomy: Anatomy, grid: Grid, s0: int, s1: int, with_fractures: bool = True):
    """Render series slices ``s0:s1``.

    Returns ``(hu, labels, tissue, breaks)``: float32 HU (noise-free), uint8 labels, uint8 tissue
    codes, each (s1-s0, rows, columns), and ``breaks``: {(bone name, fracture index): uint8 mask
    of the pixels that the fracture changed, same shape: 1 where the bone's HU over soft tissue
    changed by more than :data:`BREAK_ANY`, 2 where by more than :data:`BREAK_STRONG`, 3 where
    by more than :data:`BREAK_VISIBLE`}.
    """
    shape = (s1 - s0, grid.rows, grid.columns)
    pixel = float(min(grid.dr, grid.dc))
    hu = np.full(shape, HU_AIR, np.float32)
    tissue = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    breaks: dict[tuple[str, int], Array] = {}
    # Soft tissue over the full slices, in the spine frame.
    m = anatomy.rot.T
    x, y, z = _local_coords(grid, np.arange(s0, s1), np.arange(grid.rows),
                            np.arange(grid.columns), anatomy.origin, m)  # fmt: skip
    anatomy.neck.evaluate(x, y, z, pixel, hu, tissue)
    del x, y, z
    # Discs.
    for centre, rot, ax, ay, hz in anatomy.discs:
        win = _window(grid, s0, s1, anatomy.world(centre), max(ax, ay, hz) + 2 * pixel)
        if win is None:
            continue
        ss, rr, cc = win
        mm = rot.T @ anatomy.rot.T
        x, y, z = _local_coords(grid, ss, rr, cc, anatomy.world(centre), mm)
        sub = np.ix_(ss - s0, rr, cc)
        h, t = hu[sub], tissue[sub]
        _layer(h, t, sd_elliptic_cylinder(x, y, z, (0, 0, 0), ax, ay, hz), pixel, anatomy.disc_hu,
               TISSUES["disc"])  # fmt: skip
        hu[sub], tissue[sub] = h, t
    # Bones.
    for bone in anatomy.bones:
        centre_world = anatomy.world(bone.centre)
        win = _window(grid, s0, s1, anatomy.bone_world(bone, bone.bound), bone.radius + 2 * pixel)
        if win is None:
            continue
        ss, rr, cc = win
        mm = bone.rot.T @ anatomy.rot.T
        x, y, z = _local_coords(grid, ss, rr, cc, centre_world, mm)
        d = bone.sdf(x, y, z)
        core = d + bone.shell  # the cancellous interior, under a cortical shell
        if with_fractures:
            for k, frac in enumerate(bone.fractures):
                before = _bone_on_soft_tissue(bone, d, core, pixel)
                d, core = apply_fracture(bone.sdf, frac, x, y, z, d, core, bone.shell)
                delta = np.abs(_bone_on_soft_tissue(bone, d, core, pixel) - before)
                if (delta > BREAK_ANY).any():
                    mask = np.zeros(shape, np.uint8)  # 1 touched, 2 clearly changed, 3 visible
                    mask[np.ix_(ss - s0, rr, cc)] = (
                        (delta > BREAK_ANY).astype(np.uint8) + (delta > BREAK_STRONG)
                        + (delta > BREAK_VISIBLE)
                    )  # fmt: skip
                    breaks[(bone.name, k)] = mask
        sub = np.ix_(ss - s0, rr, cc)
        h, t, lab = hu[sub], tissue[sub], labels[sub]
        _layer(h, t, d, pixel, bone.cortical_hu, TISSUES["cortical"])
        _layer(h, t, core, pixel, bone.cancellous_hu, TISSUES["cancellous"])
        if bone.label:
            lab[d < 0] = bone.label
        hu[sub], tissue[sub], labels[sub] = h, t, lab
    return hu, labels, tissue, breaks


def _bone_on_soft_tissue(bone: Bone, d: Array, core: Array, pixel: float) -> Array:
    """HU of the bone (distance ``d``, cancellous core ``core``) composited over soft tissue:
    what a break changes, noise-free."""
    hu = np.full(d.shape, HU_SOFT, np.float32)
    hu += np.clip(0.5 - d / pixel, 0.0, 1.0) * (bone.cortical_hu - hu)
    hu += np.clip(0.5 - core / pixel, 0.0, 1.0) * (bone.cancellous_hu - hu)
    return hu


def apply_fracture(sdf: Sdf, frac: Fracture, x: Array, y: Array, z: Array, d: Array, core: Array,
                   shell: float) -> tuple[Array, Array]:  # fmt: skip
    """A fracture (what the RSNA fracture boxes frame): the bone's distance ``d`` and the distance
    ``core`` of its cancellous interior (``d + shell`` for intact bone) after the fracture.

    The fragment on the +normal side within the crack sphere is displaced (with its cortex: a
    step-off), then the crack slab is cut out of both. The crack walls are bare cancellous bone,
    not a new cortical shell, so on a slice the cortical ring is interrupted by a lucent line, as
    in a real fracture, instead of turning into a smooth notch that looks like normal anatomy.
    """
    (p0, p1, p2), (n0, n1, n2) = (float(v) for v in frac.point), (float(v) for v in frac.normal)
    px, py, pz = x - p0, y - p1, z - p2
    along = px * n0 + py * n1 + pz * n2
    near = np.sqrt(px * px + py * py + pz * pz) - float(frac.radius)
    d, core = d.copy(), core.copy()
    if np.any(frac.shift):
        frag = (along > 0) & (near < 0)
        if frag.any():
            sx, sy, sz = (float(v) for v in frac.shift)
            d[frag] = sdf(x[frag] - sx, y[frag] - sy, z[frag] - sz)
            core[frag] = d[frag] + shell
    crack = np.maximum(np.abs(along) - float(frac.gap) / 2, near)
    return np.maximum(d, -crack), np.maximum(core, -crack)
