"""Quantization methods, one module each: `int8` (static QDQ, types and float layers decided by measuring),
`fp16` (GPU targets), `qat` (int8's plan, fine-tuned with fake quantization), `haq` (per-layer precision
searched by a DDPG agent on measured costs). The engine they share is squeeze.quant: calibration, QDQ export,
the parity floor, fake quantization, per-layer costs, and the checks every result passes before it is handed
back (squeeze.quant.run)."""

__all__: list[str] = []
