"""The base of the extractors that run a Hugging Face model (CLIP, DINOv2, the SegFormer
parser): building it in each weights mode and setting it up on a device, written once.

- `pretrained`: `model_class().from_pretrained(model_id, revision=...)` (a hub id or a local
  directory; HF_HUB_OFFLINE=1 keeps it to the local cache);
- `random` / `tiny`: `model_class()(make_config(architecture_config()))` under
  `seeded(seed)`, which seeds the init without disturbing the caller's global RNG stream;
- `setup(device)`: frozen, eval, fp32 on CPU and the dataset's dtype on CUDA
  (`compute_dtype_policy`), `prepare(model)` for what a subclass changes, the processor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from posedata.extractors.base import Extractor, torch_dtype

# fp16 matmuls on CPU are slow and inexact; on CUDA the encoders run in the dataset's dtype
# (fp16 by default, as the official code ran them)
COMPUTE_DTYPE_POLICY = "cpu:fp32,cuda:dataset-dtype"


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's RNG seeded with `seed` inside the block, restored after it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class HFEncoderExtractor(Extractor):
    """Subclasses say which model class (`model_class`), its random / tiny architecture
    (`architecture_config`), and optionally `make_config`, `prepare` and
    `build_processor`."""

    def __init__(
        self,
        weights: str = "pretrained",
        model: str | None = None,
        resolution: tuple[int, int] = (512, 352),
        dtype: str = "fp16",
        seed: int = 0,
        revision: str | None = None,
    ) -> None:
        super().__init__(weights=weights, model=model, resolution=resolution, dtype=dtype, seed=seed)
        self.revision = revision
        self._model = None
        self._processor = None
        self._compute_dtype = None

    def model_class(self) -> type:
        raise NotImplementedError

    def architecture_config(self) -> dict[str, Any] | None:
        """The config random/tiny modes build; None for pretrained (the checkpoint's own)."""
        raise NotImplementedError

    def make_config(self, config: dict[str, Any]) -> Any:
        return self.model_class().config_class(**config)

    def build_model(self):
        cls = self.model_class()
        if self.weights == "pretrained":
            return cls.from_pretrained(self.model_id, **({"revision": self.revision} if self.revision else {}))
        with seeded(self.seed):
            return cls(self.make_config(self.architecture_config()))

    def build_processor(self) -> Any:
        return None

    def prepare(self, model: Any) -> None:
        """Called on the built model before it moves to the device."""

    def setup(self, device: str) -> None:
        import torch

        super().setup(device)
        self._compute_dtype = torch_dtype(self.dtype) if str(device).startswith("cuda") else torch.float32
        model = self.build_model()
        model.requires_grad_(False)
        self.prepare(model)
        self._model = model.to(device=device, dtype=self._compute_dtype).eval()
        self._processor = self.build_processor()
