"""Typed target schema and discovery of the shipped and user target files.

A target says where a model runs (runtime + device) and how its latency is measured there.
A TVM target's board (`tvm.rpc`) can also come from the environment (SQUEEZE_RPC_HOST, SQUEEZE_RPC_PORT,
SQUEEZE_RPC_TRACKER, SQUEEZE_RPC_KEY, SQUEEZE_RPC_EMULATED), which overrides the file; the CLI flags
--rpc/--tracker/--key set those variables for one command, so they override both.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from squeeze.errors import TargetError
from squeeze.util.resources import data_dir
from squeeze.util.yamlio import load_yaml_model

__all__ = ["Target", "ProtocolDefaults", "TvmOptions", "RpcOptions", "list_targets", "load_target", "parse_host_port",
           "refuse_emulated_latency", "RPC_ENV"]

# Where a TVM board is, from the environment (the CLI flags --rpc/--tracker/--key set these for one command).
RPC_ENV = ("SQUEEZE_RPC_HOST", "SQUEEZE_RPC_PORT", "SQUEEZE_RPC_TRACKER", "SQUEEZE_RPC_KEY", "SQUEEZE_RPC_EMULATED")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProtocolDefaults(_Strict):
    """How latency is measured on this target unless the command overrides it."""

    warmup: int = Field(10, ge=0, description="untimed runs before timing")
    repeat: int = Field(30, ge=3, description="timed samples")
    min_repeat_ms: float = Field(20.0, ge=0, description="each sample loops the model until this long")
    batch_size: int = Field(1, ge=1)
    seed: int = 0


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """'10.0.0.5:9190' -> ('10.0.0.5', 9190); anything else is a TargetError naming `what`."""
    m = re.fullmatch(r"\s*([^\s:]+):(\d{1,5})\s*", text or "")
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise TargetError(f"{what} `{text}` is not HOST:PORT.", "Write it like 192.168.1.20:9090.")
    return m.group(1), int(m.group(2))


class RpcOptions(_Strict):
    """A remote board reached over TVM RPC: directly (host + port of its rpc_server) or through an
    rpc_tracker + the key the board registered with."""

    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tracker: str | None = Field(None, description="HOST:PORT of an rpc_tracker")
    key: str | None = Field(None, description="device key registered with the tracker")
    session_timeout_s: float = Field(600.0, gt=0, description="the server ends a session after this long")
    connect_timeout_s: float = Field(10.0, gt=0, description="per attempt: connect, handshake, tracker request")
    retries: int = Field(2, ge=0, description="extra connection attempts before giving up")
    emulated: bool = Field(False, description="an emulated board (qemu): numerics and plumbing only, never latency")

    @field_validator("tracker")
    @classmethod
    def _tracker_is_host_port(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_host_port(v, "tracker")
            except TargetError as exc:
                raise ValueError(exc.what) from None
        return v

    @model_validator(mode="after")
    def _one_way_to_the_board(self) -> "RpcOptions":
        if (self.host is None) != (self.port is None):
            raise ValueError("`host` and `port` go together (the board's rpc_server address)")
        if self.host is not None and self.tracker is not None:
            raise ValueError("give either host + port (direct) or tracker + key, not both")
        if self.tracker is not None and not self.key:
            raise ValueError("a tracker needs the `key` the board registered with")
        return self

    @property
    def address(self) -> str | None:
        """How the board is reached, for messages: `H:P` or `tracker H:P, key K`; None when not configured."""
        if self.tracker:
            return f"tracker {self.tracker}, key {self.key}"
        return f"{self.host}:{self.port}" if self.host else None


_CLI_STYLE = re.compile(r"^\s*-|\s-")


class TvmOptions(_Strict):
    target: str | dict[str, Any] = Field(
        description="`detect` (this machine's CPU, or its GPU for device cuda), a TVM target tag "
                    "(raspberry-pi/4b-aarch64, nvidia/nvidia-a100) or a target dict {kind: llvm, mcpu: ...}")
    host: str | dict[str, Any] | None = Field(None, description="target of the host code (default: the target's own)")
    compile_only_target: str | dict[str, Any] | None = Field(
        None, description="what to generate code for where the device is absent (runner compile-only, or no GPU here)")
    runner: Literal["local", "rpc", "compile-only"] = "local"
    cross_compiler: str | None = Field(None, description="e.g. aarch64-linux-gnu-g++")
    rpc: RpcOptions | None = None
    tuning: Literal["none", "metaschedule"] = "none"
    tuning_trials: int = Field(0, ge=0, description="MetaSchedule trials per task (fused layer shape); a task "
                                                    "already tuned that far is reused from the database")

    @field_validator("target", "host", "compile_only_target")
    @classmethod
    def _no_cli_strings(cls, v):
        if isinstance(v, str) and _CLI_STYLE.search(v):
            raise ValueError(f"`{v}` is a CLI-style target string, which TVM 0.27 rejects: write a dict, e.g. "
                             "{kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a72}, or a tag")
        return v

    @model_validator(mode="after")
    def _tuning_needs_trials(self) -> "TvmOptions":
        if self.tuning == "metaschedule" and self.tuning_trials == 0:
            raise ValueError("tuning: metaschedule needs `tuning_trials` >= 1 (trials per task, e.g. 64)")
        if self.tuning == "none" and self.tuning_trials:
            raise ValueError("`tuning_trials` is set but `tuning` is none; set tuning: metaschedule")
        return self


class Target(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    runtime: str = Field(description="a registered runtime (squeeze list runtimes)")
    device: Literal["cpu", "cuda", "arm"] = "cpu"
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int | None = Field(None, ge=1, description="intra-op threads; default: all cores")
    protocol: ProtocolDefaults = ProtocolDefaults()
    tvm: TvmOptions | None = None
    source: str = Field("", exclude=True, description="where this target was read from")

    @field_validator("runtime")
    @classmethod
    def _registered_runtime(cls, v: str) -> str:
        from squeeze.measure.runtimes import runtime_registry  # imports this module: load it at validation time

        if v not in runtime_registry:
            raise ValueError(f"unknown runtime `{v}`; registered runtimes: {', '.join(runtime_registry.names())} "
                             "(a runtime plugin adds its own: pip install it, it registers through the "
                             "`squeeze.runtimes` entry-point group)")
        return v

    @property
    def emulated(self) -> bool:
        """Measured on an emulated board: its latency says nothing about the real device."""
        return bool(self.tvm and self.tvm.runner == "rpc" and self.tvm.rpc and self.tvm.rpc.emulated)


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
    return _with_rpc_env(target).model_copy(update={"source": str(path)})


def _with_rpc_env(target: Target) -> Target:
    """An RPC target's board from SQUEEZE_RPC_* where set. A way to reach the board given there (host + port,
    or a tracker) replaces the file's way; a key or the emulated mark alone only changes that field."""
    if target.tvm is None or target.tvm.runner != "rpc":
        return target
    env = {k: os.environ[k] for k in RPC_ENV if os.environ.get(k)}
    if not env:
        return target
    rpc = (target.tvm.rpc or RpcOptions()).model_dump()
    if "SQUEEZE_RPC_HOST" in env or "SQUEEZE_RPC_PORT" in env:
        port = env.get("SQUEEZE_RPC_PORT", str(rpc["port"] or ""))
        if not port.isdigit():
            raise TargetError(f"SQUEEZE_RPC_PORT `{port}` is not a port number.",
                              "Set both SQUEEZE_RPC_HOST and SQUEEZE_RPC_PORT (e.g. 192.168.1.20 and 9090).")
        rpc.update(host=env.get("SQUEEZE_RPC_HOST") or rpc["host"] or "127.0.0.1", port=int(port), tracker=None)
    if "SQUEEZE_RPC_TRACKER" in env:
        parse_host_port(env["SQUEEZE_RPC_TRACKER"], "SQUEEZE_RPC_TRACKER")
        rpc.update(tracker=env["SQUEEZE_RPC_TRACKER"], host=None, port=None)
    if "SQUEEZE_RPC_KEY" in env:
        rpc["key"] = env["SQUEEZE_RPC_KEY"]
    if "SQUEEZE_RPC_EMULATED" in env:
        rpc["emulated"] = env["SQUEEZE_RPC_EMULATED"].strip().lower() in ("1", "true", "yes")
    try:
        resolved = RpcOptions(**rpc)
    except ValueError as exc:
        raise TargetError(f"The board of target `{target.name}` from SQUEEZE_RPC_* is inconsistent: "
                          f"{_first_error(exc)}.", "Check the SQUEEZE_RPC_* variables (or the --rpc/--tracker/--key "
                          "flags).") from None
    return target.model_copy(update={"tvm": target.tvm.model_copy(update={"rpc": resolved})})


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    return errors()[0]["msg"].removeprefix("Value error, ") if errors else str(exc)


def refuse_emulated_latency(target: Target, use: str) -> None:
    """Emulated latency is plumbing, not a device figure: no budget or gate may rest on it."""
    if target.emulated:
        raise TargetError(
            f"Target `{target.name}` runs on an emulated board (qemu): its latency is not the device's latency and "
            f"cannot be used as {use}.",
            "Measure on the real board (unset SQUEEZE_RPC_EMULATED / `tvm.rpc.emulated`), or use a --macs or "
            "--size-bytes budget.",
        )
