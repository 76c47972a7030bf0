"""Device mesh and logical-axis rules: the only module that knows mesh axis names.

Model code names logical axes (`batch seq embed heads head_dim mlp vocab positions`);
a rule set maps each to a mesh axis (or a tuple of them, or None = replicated).
"""

import contextlib
import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "positions")
_REPLICATED = {name: None for name in LOGICAL_AXES}
RULES = {  # logical axis -> mesh axis or tuple; exactly one entry per name
    "dp": _REPLICATED | {"batch": ("data", "fsdp")},
    "fsdp": _REPLICATED | {"batch": ("data", "fsdp"), "embed": "fsdp"},
    "fsdp_tp": _REPLICATED | {"batch": ("data", "fsdp"), "embed": "fsdp",
                              "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
                              "vocab": "tensor"},
}



def check_rules(rules: dict, name: str = "rules") -> None:
    """A rule set names every logical axis exactly once and only known mesh axes."""
    missing, extra = set(LOGICAL_AXES) - set(rules), set(rules) - set(LOGICAL_AXES)
    if missing or extra:
        raise ValueError(f"{name}: missing logical axes {sorted(missing)}, unknown "
                         f"{sorted(extra)}")
    for logical, axes in rules.items():
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"{name}: {logical!r} -> unknown mesh axis {axis!r}; "
                                 f"mesh axes are {MESH_AXES}")


for _name, _rules in RULES.items():
    check_rules(_rules, f"RULES[{_name!r}]")


def resolve_mesh_shape(shape, n_devices: int) -> tuple[int, ...]:
    """Fill the one -1 in `shape` so the product is n_devices; errors name the shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, "
                         f"got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape {shape}: sizes must be >= 1 with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if n_devices % known:
        raise ValueError(f"mesh.shape {shape} does not divide the {n_devices} devices")
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ValueError(f"mesh.shape {shape} uses {math.prod(shape)} devices, "
                         f"but {n_devices} are present")
    return shape


def make_mesh(shape, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = resolve_mesh_shape(shape, len(devices))
    # jax 0.10 defaults to Explicit axes; the in/out-shardings style needs Auto.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def logical_to_spec(names, rules: dict) -> PartitionSpec:
    """('batch', 'seq') -> PartitionSpec(('data', 'fsdp'), None); strict about names."""
    used, spec = set(), []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(rules)}")
        axes = rules[name]
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> unknown mesh axis {axis!r}")
            if axis in used:
                raise ValueError(f"mesh axis {axis!r} used twice in logical axes {names}")
            used.add(axis)
        spec.append(axes)
    return PartitionSpec(*spec)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def tree_shardings(tree, mesh: Mesh, rules: dict):
    """NamedShardings for every leaf of an (abstract) tree of nnx Variables / arrays.

    Variables carry logical names as `out_sharding` metadata (also inside optax moments);
    plain leaves (step counters, scalars) are replicated. Divisibility is checked here, before
    compiling, and a failure names the parameter.
    """
    def one(path, leaf):
        names = None
        if isinstance(leaf, nnx.Variable):
            if not hasattr(leaf.get_value(), "shape"):
                return leaf.get_value()   # an empty placeholder (optax's MaskedNode): no array
            names = leaf.get_metadata().get("out_sharding")
            shape = leaf.get_value().shape
        else:
            shape = np.shape(leaf)
        if not names:
            return NamedSharding(mesh, PartitionSpec())
        if len(names) != len(shape):
            raise ValueError(f"{jax.tree_util.keystr(path)}: {len(names)} axis names {names} "
                             f"for shape {shape}")
        try:
            spec = logical_to_spec(names, rules)
        except ValueError as e:
            raise ValueError(f"{jax.tree_util.keystr(path)} {tuple(shape)}: {e}") from None
        for dim, name, axes in zip(shape, names, spec):
            size = _axis_size(mesh, axes)
            if dim % size:
                raise ValueError(f"{jax.tree_util.keystr(path)} {tuple(shape)}: dim {dim} "
                                 f"({name}) not divisible by {axes} ({size})")
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(
        one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    # A Variable maps to one sharding; give its inner value the same so the result has the
    # tree's structure (jit wants shardings with the arguments' structure).
    return jax.tree.map(lambda var, sh: sh if not isinstance(var, nnx.Variable) else
                        var.replace(sh), tree, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: dict, ndim: int = 2) -> NamedSharding:
    """Sharding for a batch array whose first dim is `batch` ([B, T] or [B, T+1])."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def batch_divisor(mesh: Mesh, rules: dict) -> int:
    """How many ways the batch dimension is split."""
    return _axis_size(mesh, rules["batch"])


# (mesh, rules) while a sharded step is traced (`activations`), for `constrain`.
_TRACING: list = []


@contextlib.contextmanager
def activations(mesh: Mesh, rules: dict):
    """Within: `constrain` pins activations to `rules` on `mesh` (make_trainer traces its
    steps here)."""
    _TRACING.append((mesh, rules))
    try:
        yield
    finally:
        _TRACING.pop()


def constrain(x, names):
    """x with its dims sharded by logical `names`, inside `activations`; else x unchanged.

    The model pins its activations (batch rows over the batch axes, heads or MLP units
    over `tensor`): left to propagation, XLA shards them like the FSDP weights, along
    `embed`, and all-gathers whole global batches of activations, which costs FSDP more
    memory per device than plain data parallel. Activations never name `embed`."""
    if not _TRACING:
        return x
    mesh, rules = _TRACING[-1]
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, logical_to_spec(names, rules)))


def batch_share(mesh: Mesh, rules: dict) -> tuple[int, int]:
    """(index, count): this process feeds rows [index * B / count, (index + 1) * B / count)
    of every global batch of B rows. Processes whose devices hold the same rows (the batch
    split fewer ways than there are processes, e.g. tensor parallel across hosts) share an
    index and must feed the same rows, so they read the same data."""
    return _batch_share(mesh, rules["batch"], jax.process_index())


@functools.cache
def _batch_share(mesh: Mesh, axes, process: int) -> tuple[int, int]:
    ways = _axis_size(mesh, axes)
    rows: dict[int, set] = {}
    placement = NamedSharding(mesh, PartitionSpec(axes)).devices_indices_map((ways,))
    for device, (index,) in placement.items():
        rows.setdefault(device.process_index, set()).add(index.start or 0)
    blocks = sorted({tuple(sorted(r)) for r in rows.values()})
    per = ways // len(blocks)
    if blocks != [tuple(range(i * per, (i + 1) * per)) for i in range(len(blocks))]:
        raise ValueError(f"mesh {dict(mesh.shape)}: the processes' devices hold batch shards "
                         f"{[sorted(r) for _, r in sorted(rows.items())]} of the {ways} the "
                         f"batch is split over {axes}; each process needs one contiguous "
                         f"block, the same size for all")
    return blocks.index(tuple(sorted(rows[process]))), len(blocks)
