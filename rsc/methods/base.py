"""The interface every de-biasing method implements, and the registry that names them.

A method turns (prompts, seeds, sampling settings) into images with the same
frozen backbone and scheduler as every other method, so an evaluation compares
methods image for image: image ``i`` depends only on its prompt, its seed and
the method's settings. Cost (time, UNet passes, memory) is measured by the
caller around :meth:`Method.render`, so no method reports its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from torch import Tensor

from rsc.sampling import sample

if TYPE_CHECKING:
    from rsc.backbone import FrozenLDM
    from rsc.callbacks.measures import ValidationPrompt
    from rsc.classifiers.base import AttributeClassifier


@dataclass(frozen=True)
class SamplingSettings:
    """What every method samples with: steps, classifier-free guidance and the scheduler (diffusers class name)."""

    steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (part of every cached image's identity)."""
        return asdict(self)


@dataclass
class MethodContext:
    """What a method may use besides its own options: the frozen backbone and the evaluation's classifier."""

    ldm: FrozenLDM
    classifier: AttributeClassifier | None = None


class Method(ABC):
    """A way to produce (de-biased) images from a frozen backbone.

    Subclasses set :attr:`name` (the registry key, see :func:`register`), take their options as
    typed keyword arguments, load what they need in :meth:`setup` and sample in :meth:`render`.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._context: MethodContext | None = None

    def setup(self, context: MethodContext) -> None:
        """Load what the method needs for ``context``'s backbone; raise a clear error if it does not fit."""
        self._context = context

    @property
    def context(self) -> MethodContext:
        """The context of :meth:`setup`."""
        if self._context is None:
            raise RuntimeError(f"method {self.name!r}: call setup() before render()")
        return self._context

    def options(self) -> dict[str, Any]:
        """The options that define this method's images (JSON-able); part of every cached image's identity."""
        return {}

    def identity(self) -> dict[str, Any]:
        """Name and options, plus anything loaded in :meth:`setup` that changes the images (e.g. weights' hashes)."""
        return {"method": self.name, **self.options()}

    def unets(self) -> list[Any]:
        """The UNet modules :meth:`render` runs (the cost counts their passes); default: the backbone's."""
        return [self.context.ldm.unet]

    @abstractmethod
    def render(self, prompts: Sequence[ValidationPrompt], seeds: Sequence[int], sampling: SamplingSettings) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] on the CPU, one per (prompt, seed)."""

    def _sample(self, texts: Sequence[str], seeds: Sequence[int], sampling: SamplingSettings, **kwargs: Any) -> Tensor:
        """rsc's sampler on this context's backbone, one batch, no progress bar (the caller shows one)."""
        return sample(
            self.context.ldm, list(texts), list(seeds), steps=sampling.steps, guidance_scale=sampling.guidance_scale,
            scheduler=sampling.scheduler, batch_size=max(1, len(texts)), progress=False, **kwargs,
        ).images


#: Registered methods by name.
METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is taken by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, options: dict[str, Any] | None = None, where: str = "method") -> Method:
    """Instantiate the method registered as ``name`` with ``options``; clear errors for unknown names or options."""
    if name not in METHODS:
        raise ValueError(f"{where}: unknown method {name!r}; known methods: {sorted(METHODS)}")
    try:
        return METHODS[name](**(options or {}))
    except TypeError as error:
        raise ValueError(f"{where}: bad options {options} for method {name!r}: {error}") from error
