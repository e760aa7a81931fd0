"""Where a model's weights go when one device is not enough: `--device-map`, and the placements the engine runs.

The weights are placed by transformers' own device-map mechanism (accelerate underneath), at load. The engine then
runs each decoder layer on the device that holds its weights, keeps that layer's memory there and moves only the
hidden states between devices (core/engine.py). That needs two things of a placement, checked here:
  - every decoder layer whole on one device (its memory and attention live beside its projections);
  - no weights offloaded to the CPU or disk behind accelerate's hooks: such a layer's weights sit on the `meta`
    device and would be copied in at every call, and the engine, which calls the submodules itself, would put
    that layer's memory on `meta`. A map mixing "cpu" with GPUs means exactly that offloading, so it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from infllm.errors import ResourceError, UsageError

# transformers computes these maps itself from the free memory of every visible GPU.
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

DeviceMap = str | dict[str, int | str]


def parse_device_map(spec: str | None, device: str = "auto") -> DeviceMap | None:
    """--device-map: None, one of AUTO_MAPS, a JSON object {module: device}, or a file holding one.

    Devices are GPU indices (0, 1, ...) or names torch knows ("cuda:1", "cpu"); UsageError for anything else,
    and for a --device other than auto beside a map.
    """
    if spec is None:
        return None
    if device != "auto":
        raise UsageError("--device and --device-map cannot be used together: the map says where each module goes")
    spec = spec.strip()
    if spec in AUTO_MAPS:
        return spec
    if spec.startswith("{"):
        text, where = spec, "--device-map"
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UsageError(f"--device-map takes {', '.join(AUTO_MAPS)}, a JSON object or a JSON file; "
                             f"'{spec}' is none of these")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read the device map {path}: {err}") from None
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise UsageError(f"{where}: not a device map (JSON nested deeper than Python's stack)") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UsageError(f"{where}: a device map is a non-empty JSON object of module name -> device")
    mapping = {str(name): _map_device(name, value, where) for name, value in mapping.items()}
    if len(map_devices(mapping)) > 1 and "cpu" in map_devices(mapping):
        raise UsageError(f"{where}: the map mixes 'cpu' with GPUs; accelerate would keep those modules' weights on "
                         "the CPU and copy them in at every call, which infllm does not run: map every module to a "
                         "GPU, or everything to 'cpu'")
    return mapping


def _map_device(name: str, value, where: str) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        device = torch.device("cuda", value)
    elif isinstance(value, str) and value not in ("disk", "meta"):
        try:
            device = torch.device(value)
        except RuntimeError:
            device = None
    else:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "xpu", "mps"):
        raise UsageError(f"{where}: module '{name}' is mapped to {value!r}; use a GPU index (0, 1, ...), "
                         "'cuda:N' or 'cpu' (offloading to disk is not supported)")
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        index = device.index or 0
        if index >= visible:
            raise UsageError(f"{where}: module '{name}' is mapped to GPU {index}, but {visible} "
                             f"GPU{'s are' if visible != 1 else ' is'} visible")
    return value


def map_devices(device_map: DeviceMap) -> set[str]:
    """Device types a map will use: an automatic map uses the GPUs when there are any, else the CPU."""
    if isinstance(device_map, str):
        return {"cuda"} if torch.cuda.is_available() else {"cpu"}
    return {"cuda" if isinstance(v, int) else torch.device(v).type for v in device_map.values()}


def check_placement(model: torch.nn.Module) -> None:
    """Refuse a loaded placement the engine cannot run: offloaded weights, or a decoder layer split over devices."""
    if any(p.device.type == "meta" for p in model.parameters()):
        offloaded = sorted(name for name, device in (getattr(model, "hf_device_map", None) or {}).items()
                           if device in ("cpu", "disk"))
        raise ResourceError(f"the model does not fit on the visible GPUs: the device map offloaded {len(offloaded)} "
                            "module(s) to the CPU or disk, which infllm does not run; use more GPUs, "
                            "--dtype bfloat16, a smaller model or --device cpu")
    for i, layer in enumerate(model.model.layers):
        devices = {t.device for t in (*layer.parameters(), *layer.buffers())}
        if len(devices) > 1:
            raise UsageError(f"the device map splits decoder layer {i} over {', '.join(sorted(map(str, devices)))}: "
                             f"map model.layers.{i} as a whole to one device")



def drop_dispatch_hooks(model: torch.nn.Module) -> None:
    """Remove the hooks accelerate put on every submodule of a multi-device model to move each call's inputs.

    The engine moves the hidden states itself, once per layer; the hooks would inspect the arguments of every
    submodule call again (about 1.5 ms per decoded token for a 30-layer model, measured on CPU). The weights stay
    where they are; only the model's own forward loses its automatic moves, and infllm never calls it.
    """
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)
