"""Typed target schema and discovery of the shipped and user target files.

A target says where a model runs (runtime + device) and how its latency is measured there.
The TVM fields are part of the schema now so that target files keep working when that runtime lands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from squeeze.errors import TargetError
from squeeze.resources import data_dir
from squeeze.yamlio import load_yaml_model

__all__ = ["Target", "ProtocolDefaults", "TvmOptions", "RpcOptions", "list_targets", "load_target"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProtocolDefaults(_Strict):
    """How latency is measured on this target unless the command overrides it."""

    warmup: int = Field(10, ge=0, description="untimed runs before timing")
    repeat: int = Field(30, ge=3, description="timed samples")
    min_repeat_ms: float = Field(20.0, ge=0, description="each sample loops the model until this long")
    batch_size: int = Field(1, ge=1)
    seed: int = 0


class RpcOptions(_Strict):
    """A remote board reached over TVM RPC: directly (host:port) or through a tracker + key."""

    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tracker: str | None = Field(None, description="HOST:PORT of an rpc_tracker")
    key: str | None = Field(None, description="device key registered with the tracker")
    session_timeout_s: float = Field(600.0, gt=0)
    retries: int = Field(2, ge=0)


class TvmOptions(_Strict):
    target: str | dict[str, Any] = Field(description="a TVM target tag or a target dict")
    host: str | dict[str, Any] | None = None
    runner: Literal["local", "rpc", "compile-only"] = "local"
    cross_compiler: str | None = Field(None, description="e.g. aarch64-linux-gnu-g++")
    rpc: RpcOptions | None = None
    tuning: Literal["none", "metaschedule"] = "none"
    tuning_trials: int = Field(0, ge=0)


class Target(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    runtime: Literal["onnxruntime", "tvm"]
    device: Literal["cpu", "cuda", "arm"] = "cpu"
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: all cores")
    protocol: ProtocolDefaults = ProtocolDefaults()
    tvm: TvmOptions | None = None
    source: str = Field("", exclude=True, description="where this target was read from")


def _builtin_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(data_dir("targets").glob("*.yaml"))}


def list_targets() -> list[Target]:
    return [load_target(str(p)) for p in _builtin_files().values()]


def load_target(name_or_path: str) -> Target:
    """A shipped target by name, or a user target file by path (anything ending in .yaml/.yml)."""
    builtin = _builtin_files()
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise TargetError(f"Target file {path} does not exist.", "Pass a shipped target name or an existing YAML file.")
    elif name_or_path in builtin:
        path = builtin[name_or_path]
    else:
        raise TargetError(
            f"Unknown target `{name_or_path}`.",
            f"Known targets: {', '.join(builtin) or '(none)'}; or pass a target YAML file by path "
            "(see `squeeze targets show host-cpu` for the format).",
        )
    target = load_yaml_model(path, Target, TargetError, "target")
    if target.runtime == "tvm" and target.tvm is None:
        raise TargetError(f"Target file {path}: runtime `tvm` needs a `tvm:` section.", "Add `tvm: {target: ...}`.")
    return target.model_copy(update={"source": str(path)})
