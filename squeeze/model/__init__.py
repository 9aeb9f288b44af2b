"""The model side: `loading` (model references, checkpoints, `LoadedModel`), `summary` (parameters, MACs per
layer) and `zoo` (the built-in architectures, their light index, trained entries). Import the submodule you
need: this package imports nothing, so the light commands that read the zoo's index stay free of torch."""

__all__: list[str] = []
