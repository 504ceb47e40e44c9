"""HF-layout safetensors checkpoints: load into DeepseekV3 (dequantising FP8 blocks) and save from it.

HF names vs ours: HF prefixes `model.`, stores routed experts one by one
(`mlp.experts.E.{gate,up,down}_proj.weight`, or transformers-5's fused in-memory
`mlp.experts.gate_up_proj` [E, 2F, D] / `mlp.experts.down_proj` [E, D, F]) where we stack them, and puts
MTP module k at layer index num_hidden_layers + k (its `shared_head.norm` is our `mtp.k.norm`, its block
tensors are our `mtp.k.block.*`; `shared_head.head` and `embed_tokens` there are copies of ours).
Pickled weights (.bin, .pt) are refused without being opened.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dsv3c.inputs import load_json, parse_json
from dsv3c.ops import fp8 as fp8q

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE = "_scale_inv"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate|up|down)_proj$")
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip  (safetensors dtype tag → bytes per element)
_FLOAT_TAGS = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 * 10**6  # the safetensors format's own limit on a header; index files stay far below it


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the one-line message names the tensor or file."""


# ---- names ------------------------------------------------------------------------------


def hf_name(fqn: str, n_layers: int) -> str:
    """The HF checkpoint name of our non-expert tensor fqn (MTP module k at layer n_layers + k)."""
    if fqn.startswith("mtp."):
        _, k, rest = fqn.split(".", 2)
        layer = f"model.layers.{n_layers + int(k)}."
        if rest.startswith("block."):
            return layer + rest[len("block.") :]
        return layer + ("shared_head." + rest if rest.startswith("norm.") else rest)
    return fqn if fqn.startswith("lm_head.") else "model." + fqn


def hf_expert_name(fqn: str, expert: int, n_layers: int) -> str:
    """The HF per-expert name of expert `expert`'s slice of our stacked `...mlp.experts.{gate,up,down}_proj`."""
    prefix, proj = _STACKED.match(fqn).groups()
    return f"{hf_name(prefix, n_layers)}.{expert}.{proj}_proj.weight"


def _expected_names(model: nn.Module) -> dict[str, tuple]:
    """{HF name: (kind, our fqn, expert)} of every tensor a checkpoint may hold for model.

    kind: 'whole' (the tensor, stacked experts included), 'expert' (one expert's slice),
    'gate_up' (transformers-5 fused gate and up of all experts), 'copy' (MTP copy of a shared tensor).
    """
    n = model.cfg.num_hidden_layers
    names = {}
    for fqn, t in model.state_dict(keep_vars=True).items():
        m = _STACKED.match(fqn)
        if not m:
            names[hf_name(fqn, n)] = ("whole", fqn, None)
            continue
        for e in range(t.shape[0]):
            names[hf_expert_name(fqn, e, n)] = ("expert", fqn, e)
        prefix, proj = m.groups()
        if proj == "down":
            names[f"{hf_name(prefix, n)}.down_proj"] = ("whole", fqn, None)
        elif proj == "gate":
            names[f"{hf_name(prefix, n)}.gate_up_proj"] = ("gate_up", prefix, None)
    for k in range(len(getattr(model, "mtp", []))):
        names[f"model.layers.{n + k}.shared_head.head.weight"] = ("copy", "lm_head.weight", None)
        names[f"model.layers.{n + k}.embed_tokens.weight"] = ("copy", "embed_tokens.weight", None)
    return names


def _slots(kind: str, fqn: str, expert, params: dict) -> list[tuple]:
    """The (fqn, expert) slots of our tensors that a checkpoint tensor of this kind fills."""
    if kind == "copy":
        return []
    if kind == "expert":
        return [(fqn, expert)]
    if kind == "gate_up":
        e = params[fqn + ".gate_proj"].shape[0]
        return [(f"{fqn}.{p}_proj", i) for p in ("gate", "up") for i in range(e)]
    if _STACKED.match(fqn):
        return [(fqn, i) for i in range(params[fqn].shape[0])]
    return [(fqn, None)]


def _target_shape(kind: str, fqn: str, params: dict) -> tuple:
    """The shape a checkpoint tensor of this kind must have."""
    if kind == "expert":
        return tuple(params[fqn].shape[1:])
    if kind == "gate_up":
        e, f, d = params[fqn + ".gate_proj"].shape
        return (e, 2 * f, d)
    return tuple(params[fqn].shape)


# ---- files ------------------------------------------------------------------------------


def read_header(file: Path) -> dict[str, tuple[str, tuple]]:
    """{tensor name: (dtype tag, shape)} from a safetensors header, checked against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if n < 0 or n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{file}: truncated or not a safetensors file (bad header length)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e.strerror})") from None
    try:
        header = parse_json(raw.decode("utf-8"), f"corrupt safetensors header of {file}", CheckpointError)
    except UnicodeDecodeError:
        raise CheckpointError(f"{file}: corrupt safetensors header (not UTF-8)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            out[name] = _check_entry(file, name, info, data_bytes)
    return out


def _check_entry(file: Path, name: str, info, data_bytes: int) -> tuple[str, tuple]:
    """(dtype tag, shape) of one header entry, or CheckpointError if it is malformed or past the file's end."""
    ok = isinstance(info, dict) and info.get("dtype") in _ITEMSIZE and isinstance(info.get("shape"), list)
    ok = ok and all(isinstance(d, int) and d >= 0 for d in info["shape"])
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    if not ok:
        raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name}")
    nbytes = math.prod(info["shape"]) * _ITEMSIZE[info["dtype"]]
    if offsets[0] < 0 or offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{file}: corrupt safetensors header: tensor {name} has wrong data offsets")
    if offsets[1] > data_bytes:
        raise CheckpointError(f"{file}: truncated safetensors file: tensor {name} runs past the end of the file")
    return info["dtype"], tuple(info["shape"])


def _refuse_pickle(file: Path) -> None:
    """Raise CheckpointError for a pickled weights file (never opened)."""
    raise CheckpointError(f"{file}: not a safetensors file; pickled weights (.bin/.pt) are never loaded")


def locate(path) -> dict[str, Path]:
    """{tensor name: safetensors file} of the checkpoint at path (a directory, index file or .safetensors file)."""
    p = Path(path)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(p)
        if p.name.endswith(".index.json"):
            return _read_index(p)
        return {name: p for name in read_header(p)}
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such checkpoint file or directory")
    if (p / INDEX).is_file():
        return _read_index(p / INDEX)
    if (p / SINGLE).is_file():
        return {name: p / SINGLE for name in read_header(p / SINGLE)}
    pickles = sorted(f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(pickles[0])
    raise CheckpointError(f"{p}: no {SINGLE} or {INDEX} in the checkpoint directory")


def _read_index(index: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a sharded checkpoint's index, each shard checked against it."""
    try:
        weight_map = load_json(index, "checkpoint index", MAX_HEADER_BYTES, CheckpointError)["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except CheckpointError as e:
        raise CheckpointError(f"{index}: corrupt index ({e})") from None
    except (KeyError, TypeError, AssertionError):
        raise CheckpointError(f"{index}: corrupt index (needs a JSON object with a 'weight_map')") from None
    files = {}
    for name in sorted(set(weight_map.values())):
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise CheckpointError(f"{index}: shard {name} lies outside the checkpoint directory")
        shard = index.parent / rel
        if rel.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(shard)
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard listed in {index.name} is missing")
        files[name] = read_header(shard)
    for tensor, name in weight_map.items():
        if tensor not in files[name]:
            raise CheckpointError(f"{index.parent / name}: tensor {tensor} listed in the index is not in this shard")
    for name, header in files.items():
        for tensor in header:
            if weight_map.get(tensor) != name:
                raise CheckpointError(f"{index.parent / name}: tensor {tensor} not listed for this shard in the index")
    return {tensor: index.parent / name for tensor, name in weight_map.items()}


# ---- loading ----------------------------------------------------------------------------


def _block(model: nn.Module) -> int:
    """The FP8 weight block size from the model's quantization_config (128 when absent)."""
    q = getattr(model.cfg, "quantization_config", None) or {}
    size = q.get("weight_block_size", [128, 128])
    if not (isinstance(size, list) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int)):
        raise CheckpointError(f"quantization_config.weight_block_size must be [b, b], got {size}")
    return size[0]


def _scale_shape(shape: tuple, block: int) -> tuple:
    """Shape of the weight_scale_inv of an FP8 weight: ceil(out/b) × ceil(in/b), experts leading."""
    return (*shape[:-2], -(-shape[-2] // block), -(-shape[-1] // block))


def _plan(model: nn.Module, files: dict[str, Path]) -> list[tuple]:
    """Check every name, dtype and shape against the model; [(name, kind, fqn, expert, scale name or None)]."""
    headers = {f: read_header(f) for f in set(files.values())}
    params = model.state_dict(keep_vars=True)
    expected = _expected_names(model)
    block, plan, filled = _block(model), [], {}
    for name in files:
        if name.endswith(SCALE):
            base = name[: -len(SCALE)]
            if base not in files or headers[files[base]][base][0] != "F8_E4M3":
                raise CheckpointError(f"unexpected tensor {name}: no FP8 E4M3 weight {base} to scale")
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {name}{_hint(name, model.cfg)}")
        kind, fqn, expert = expected[name]
        tag, shape = headers[files[name]][name]
        want = _target_shape(kind, fqn, params)
        if shape != want:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(want)}")
        scale = name + SCALE if tag == "F8_E4M3" else None
        if tag not in _FLOAT_TAGS and scale is None:
            raise CheckpointError(f"tensor {name} has dtype {tag}; expected a float type or F8_E4M3 with {SCALE}")
        if scale is not None:
            if scale not in files:
                raise CheckpointError(f"tensor {name} is FP8 but {scale} is missing")
            stag, sshape = headers[files[scale]][scale]
            if stag != "F32" or sshape != _scale_shape(shape, block):
                want_s = list(_scale_shape(shape, block))
                raise CheckpointError(f"tensor {scale} must be F32 of shape {want_s}, got {stag} {list(sshape)}")
        for slot in _slots(kind, fqn, expert, params):
            if slot in filled:
                raise CheckpointError(f"tensor {name} fills a weight that {filled[slot]} already filled")
            filled[slot] = name
        plan.append((name, kind, fqn, expert, scale))
    _check_complete(model, params, filled)
    return plan


def _hint(name: str, cfg) -> str:
    """Why a layer-indexed tensor is unexpected, when its layer index is beyond the model."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    last = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if m and int(m.group(1)) >= last:
        n, k = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        return f" (layer {m.group(1)}; the config has {n} layers + {k} MTP)"
    return ""


def _check_complete(model: nn.Module, params: dict, filled: dict) -> None:
    """Raise CheckpointError naming the first of our tensors that no checkpoint tensor fills."""
    n = model.cfg.num_hidden_layers
    for fqn, t in params.items():
        stacked = _STACKED.match(fqn) is not None
        for e in range(t.shape[0]) if stacked else [None]:
            if (fqn, e) not in filled:
                name = hf_expert_name(fqn, e, n) if stacked else hf_name(fqn, n)
                raise CheckpointError(f"missing tensor {name} (our {fqn})")


@torch.no_grad()
def load_checkpoint(model: nn.Module, path) -> dict:
    """Copy an HF-layout safetensors checkpoint into model in place; returns {our fqn: (fp8, scale_inv)} as stored.

    The same dict is kept as model.fp8_checkpoint (empty for a checkpoint without FP8 tensors).
    """
    params = model.state_dict(keep_vars=True)
    if any(t.is_meta for t in params.values()):
        raise CheckpointError("model is on the meta device; build it on 'cpu' or 'cuda' to load weights")
    files = locate(path)
    plan, block = _plan(model, files), _block(model)
    stored, experts, copies = {}, {}, []
    by_file = {}
    for entry in plan:
        by_file.setdefault(files[entry[0]], []).append(entry)
    for file, entries in sorted(by_file.items()):
        with _open(file) as f:
            for name, kind, fqn, expert, scale in entries:
                value, raw = _read(f, files, name, scale, block)
                if kind == "copy":
                    copies.append((name, fqn, value))
                else:
                    _assign(params, kind, fqn, expert, value)
                    _record_fp8(stored, experts, params, kind, fqn, expert, raw, block)
    for name, fqn, value in copies:
        if not torch.equal(value.to(params[fqn].dtype), params[fqn]):
            raise CheckpointError(f"tensor {name} differs from {hf_name(fqn, model.cfg.num_hidden_layers)}")
    for fqn, parts in experts.items():
        if len(parts) == params[fqn].shape[0]:
            wq, s = zip(*(parts[e] for e in range(len(parts))))
            stored[fqn] = (torch.stack(wq), torch.stack(s))
    model.fp8_checkpoint = stored  # read by capture, so fp8_quant runs on exactly these codes and scales
    return stored


class _open:
    """safe_open(file) whose read errors become a one-line CheckpointError naming the file."""

    def __init__(self, file: Path):
        """Remember the file; it is opened on entry."""
        self.file = file

    def __enter__(self):
        """Open the file (memory-mapped)."""
        try:
            self.handle = safe_open(self.file, framework="pt")
            return self
        except Exception as e:  # safetensors raises its own error types
            self._fail(e)

    def __exit__(self, *exc):
        """Drop the handle, which closes the file."""
        self.handle = None

    def get_tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` of this file."""
        try:
            return self.handle.get_tensor(name)
        except Exception as e:
            self._fail(e, name)

    def _fail(self, e: Exception, name: str | None = None):
        """Raise the CheckpointError for a read failure."""
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = f"tensor {name}" if name else "file"
        raise CheckpointError(f"{self.file}: cannot read {what} ({reason})") from None


def _read(f: _open, files: dict, name: str, scale: str | None, block: int):
    """(value, (fp8, scale_inv) or None): the tensor as stored, dequantised to float32 when FP8."""
    t = f.get_tensor(name)
    if scale is None:
        return t, None
    if files[scale] == files[name]:
        s = f.get_tensor(scale)
    else:
        with _open(files[scale]) as g:
            s = g.get_tensor(scale)
    return fp8q.weight_dequant(t, s, block), (t, s)


def _assign(params: dict, kind: str, fqn: str, expert, t: torch.Tensor) -> None:
    """Copy a read tensor (dequantised when FP8) into our tensor(s)."""
    if kind == "expert":
        params[fqn][expert].copy_(t)
    elif kind == "gate_up":
        gate, up = params[fqn + ".gate_proj"], params[fqn + ".up_proj"]
        gate.copy_(t[:, : gate.shape[1]])
        up.copy_(t[:, gate.shape[1] :])
    else:
        params[fqn].copy_(t)


def _record_fp8(stored: dict, experts: dict, params: dict, kind, fqn, expert, raw, block: int) -> None:
    """Keep an FP8 tensor and its scale_inv as stored, keyed by our fqn (experts stacked once all are seen)."""
    if raw is None:
        return
    wq, s = raw
    if kind == "expert":
        experts.setdefault(fqn, {})[expert] = (wq, s)
    elif kind == "gate_up":
        f = params[fqn + ".gate_proj"].shape[1]
        if f % block == 0:  # the scale blocks split cleanly between gate and up
            stored[fqn + ".gate_proj"] = (wq[:, :f], s[:, : f // block])
            stored[fqn + ".up_proj"] = (wq[:, f:], s[:, f // block :])
    else:
        stored[fqn] = (wq, s)


# ---- saving -----------------------------------------------------------------------------


def fp8_weight_names(model: nn.Module) -> set[str]:
    """Our fqns of the weights DeepSeek ships in FP8: every linear and expert weight but lm_head and eh_proj."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod_name != "lm_head" and not mod_name.endswith("eh_proj"):
            names.add(f"{mod_name}.weight")
    names.update(fqn for fqn in model.state_dict() if _STACKED.match(fqn))
    return names


def hf_tensors(model: nn.Module, fp8_weights: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under HF checkpoint names, optionally FP8 E4M3 with `weight_scale_inv`."""
    n, block = model.cfg.num_hidden_layers, _block(model)
    quantised = fp8_weight_names(model) if fp8_weights else set()
    out = {}
    for fqn, t in model.state_dict().items():
        t = t.detach().cpu()
        if _STACKED.match(fqn):
            pieces = [(hf_expert_name(fqn, e, n), t[e]) for e in range(t.shape[0])]
        else:
            pieces = [(hf_name(fqn, n), t)]
        for name, w in pieces:
            if fqn in quantised:
                wq, s = fp8q.weight_quant(w.float(), block)
                out[name], out[name + SCALE] = wq.contiguous(), s.contiguous()
            else:
                out[name] = w.contiguous().clone()
    return out


def _shards(tensors: dict[str, torch.Tensor], shard_bytes: int) -> list[list[str]]:
    """Tensor names packed in order into shards of at most shard_bytes (a weight stays with its scale_inv)."""
    shards, current, size = [], [], 0
    for name, t in tensors.items():
        if name.endswith(SCALE):
            continue
        group = [name] + ([name + SCALE] if name + SCALE in tensors else [])
        nbytes = sum(tensors[g].numel() * tensors[g].element_size() for g in group)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current += group
        size += nbytes
    return shards + ([current] if current else [])


def save_checkpoint(model: nn.Module, path, fp8: bool = False, shard_bytes: int | None = None) -> None:
    """Write model as an HF-layout checkpoint (config.json + safetensors, sharded with an index when shard_bytes)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in [out / INDEX, out / SINGLE, *out.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # stale files would shadow or mix with the new checkpoint
    tensors = hf_tensors(model, fp8)
    meta = {"format": "pt"}
    if shard_bytes is None:
        save_file(tensors, out / SINGLE, metadata=meta)
    else:
        shards = _shards(tensors, shard_bytes)
        weight_map = {}
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: tensors[k] for k in names}, out / file, metadata=meta)
            weight_map.update(dict.fromkeys(names, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = model.cfg.to_dict()
    config["architectures"] = ["DeepseekV3ForCausalLM"]
    config.pop("quantization_config", None)
    if fp8:
        config["quantization_config"] = dict(FP8_CONFIG, weight_block_size=[_block(model)] * 2)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
