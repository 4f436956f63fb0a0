"""Typed building blocks for describing settings: the constrained types and the config-node marker.

A setting is described once, where the code that uses it lives: as a typed argument of a class or
function a config builds (``latent_dim: PosInt``), or as a field of a command's settings class
(``class SampleSettings(BaseModel)``). ``vae_cli.settings`` derives every check from these types.
This module imports nothing of vae-cli, so every layer can use it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field

# The model_config of every settings class: unknown keys refused, no silent conversions
# ("2.5" or True is not an int), no inf/nan.
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, arbitrary_types_allowed=False)

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]      # finite: allow_inf_nan=False in STRICT
NonNegFloat = Annotated[float, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]
# What pytorch_lightning.seed_everything accepts.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
PosInts = Annotated[list[PosInt], Field(min_length=1)]
Fraction = Annotated[float, Field(gt=0, lt=1)]
# torch.set_float32_matmul_precision: highest keeps float32 matmuls exact; high and medium let a GPU
# use TF32 / bf16 internally (faster on Tensor Cores, about 3 and 2 significant digits).
MatmulPrecision = Literal["highest", "high", "medium"]


def _channels(shape: list[int]) -> list[int]:
    if shape[0] not in (1, 3):
        raise ValueError("expected [C, H, W] with C 1 or 3, e.g. [1,28,28]")
    return shape


# An image's [C, H, W]: grey (1) or RGB (3).
ImageShape = Annotated[list[PosInt], Field(min_length=3, max_length=3, description="[C, H, W] with C 1 or 3, e.g. [1,28,28]"),
                       AfterValidator(_channels)]


class Builds:
    """Marks a setting that is a config node with a ``_target_`` building ``type_name`` (or a subclass).

    ``type_name`` is a dotted name (``"torch.nn.Module"``) or a type; names are imported only when
    a node's target differs from it, so describing a node costs no import.
    """

    def __init__(self, type_name: str | type) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"Builds({self.type_name!r})"


def Node(type_name: str | type) -> Any:  # noqa: N802 (reads like a type)
    """The type of a setting that is a config node building ``type_name``."""
    return Annotated[dict, Builds(type_name)]
