"""Import the published pyNanoFind U-Net (Keras 2.2 HDF5 weights) as a latticewatch profile.

The published network has exactly the layer order of `latticewatch.models.unet.UNet` (one
conv + batch-norm per encoder level, pooling of the batch-norm output, ReLU skips, two-conv
centre, decoder conv pairs, 1×1 softmax head), so importing is a renaming and transposition of
arrays: Keras numbers its layers in creation order (``conv2d_1`` … ``conv2d_14``,
``batch_normalization_1`` … ``_14``, ``final_layer``), encoder first, then centre, then decoder.
Needs torch (the ``[train]`` extra) to export the ONNX file.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from latticewatch.errors import ModelError

#: pyNanoFind trained on the 3×3-median-filtered image divided by its maximum.
KERAS_NORMALISATION = "max"


class KerasImportError(ModelError, ValueError):
    """A weight file that is not a pyNanoFind U-Net; the message names the file and the layer."""


def read_keras_weights(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Layer name → {weight name → array} from a Keras 2 ``.h5`` weight file, in file order.

    >>> layers = read_keras_weights("unet32_AuCdSeDots_09_final.h5")  # doctest: +SKIP
    >>> sorted(layers["conv2d_1"])  # doctest: +SKIP
    ['bias', 'kernel']
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            root = f["model_weights"] if "model_weights" in f else f
            names = [n.decode() if isinstance(n, bytes) else n for n in root.attrs["layer_names"]]
            layers: dict[str, dict[str, np.ndarray]] = {}
            for name in names:
                group = root[name]
                weight_names = [w.decode() if isinstance(w, bytes) else w
                                for w in group.attrs.get("weight_names", [])]
                if weight_names:
                    layers[name] = {w.split("/")[-1].split(":")[0]: np.asarray(group[w]) for w in weight_names}
    except (OSError, KeyError) as err:
        raise KerasImportError(f"{path}: not a Keras HDF5 weight file ({err})") from None
    return layers


def _numbered(layers: dict[str, dict[str, np.ndarray]], prefix: str) -> list[dict[str, np.ndarray]]:
    found = sorted((int(name.rsplit("_", 1)[1]), arrays) for name, arrays in layers.items()
                   if name.startswith(prefix))
    return [arrays for _, arrays in found]


def keras_to_state_dict(
    layers: dict[str, dict[str, np.ndarray]], source: str = "weights"
) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """Widths and a `UNet` state dict (numpy arrays) from pyNanoFind's Keras layers.

    >>> widths, state = keras_to_state_dict(read_keras_weights("unet32_AuCdSeDots_09_final.h5"))  # doctest: +SKIP
    >>> widths  # doctest: +SKIP
    (4, 8, 16, 32)
    """
    convs, norms = _numbered(layers, "conv2d_"), _numbered(layers, "batch_normalization_")
    head = layers.get("final_layer")
    if head is None or len(convs) != len(norms) or (len(convs) - 2) % 3:
        raise KerasImportError(f"{source}: expected conv2d_1…N, batch_normalization_1…N and final_layer "
                               f"of a U-Net; found {len(convs)} convs, {len(norms)} batch norms, "
                               f"final_layer {'present' if head else 'missing'}")
    levels = (len(convs) - 2) // 3
    widths = tuple(int(c["kernel"].shape[-1]) for c in convs[:levels])
    modules = [f"encoder.{i}" for i in range(levels)] + ["centre.0", "centre.1"]
    for i in range(levels):
        modules += [f"decoder.{i}.first", f"decoder.{i}.second"]
    state: dict[str, np.ndarray] = {}
    for module, conv, norm in zip(modules, convs, norms):
        state[f"{module}.conv.weight"] = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1))
        state[f"{module}.conv.bias"] = conv["bias"]
        state[f"{module}.bn.weight"] = norm["gamma"]
        state[f"{module}.bn.bias"] = norm["beta"]
        state[f"{module}.bn.running_mean"] = norm["moving_mean"]
        state[f"{module}.bn.running_var"] = norm["moving_variance"]
    state["head.weight"] = np.ascontiguousarray(head["kernel"].transpose(3, 2, 0, 1))
    state["head.bias"] = head["bias"]
    return widths, state


def import_keras_profile(h5_path: str | Path, out_dir: str | Path, *, name: str, command: str) -> Path:
    """Write a profile directory (ONNX + safetensors + manifest) from a pyNanoFind weight file.

    The published files do not state the pixel size of their training data, so the manifest
    leaves it unset and frames are analysed at their own sampling. Every file is written
    atomically, the manifest last.

    Examples
    --------
    >>> import_keras_profile("unet32_AuCdSeDots_09_final.h5", "profiles/pynanofind", name="pynanofind",
    ...                      command="latticewatch models import-keras unet32_AuCdSeDots_09_final.h5")  # doctest: +SKIP
    PosixPath('profiles/pynanofind')
    """
    import torch
    from safetensors.torch import save_file

    from latticewatch import __version__
    from latticewatch.io.atomic import atomic_path
    from latticewatch.models.export import export_onnx
    from latticewatch.models.manifest import Manifest, file_digests, sha256_of, write_manifest
    from latticewatch.models.unet import UNet

    h5_path, out_dir = Path(h5_path), Path(out_dir)
    widths, state = keras_to_state_dict(read_keras_weights(h5_path), str(h5_path))
    net = UNet(widths)
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}
    missing = set(net.state_dict()) - set(tensors) - {k for k in net.state_dict() if k.endswith("num_batches_tracked")}
    if missing:
        raise KerasImportError(f"{h5_path}: no weights for {sorted(missing)}")
    net.load_state_dict(tensors, strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "unet.safetensors") as tmp:
        save_file(net.state_dict(), str(tmp), metadata={"widths": json.dumps(list(widths))})
    with atomic_path(out_dir / "unet.onnx") as tmp:
        export_onnx(net.eval(), tmp)
    manifest = Manifest(
        name=name,
        version=__version__,
        description=f"pyNanoFind U-Net imported from {h5_path.name} (Groschner, Choi & Scott 2021); segmentation only",
        files=file_digests(out_dir, ["unet.onnx", "unet.safetensors"]),
        segmentation={"onnx": "unet.onnx", "weights": "unet.safetensors", "widths": widths, "pixel_size_nm": None,
                      "normalisation": KERAS_NORMALISATION, "threshold": 0.5},
        training={"segmentation": {"command": command,
                                   "data": f"imported from {h5_path.name} (sha256 {sha256_of(h5_path)})"}},
    )
    write_manifest(out_dir, manifest)
    return out_dir
