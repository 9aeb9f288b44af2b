"""Small helpers with no idea of models or targets: the cache folder and atomic file writes (`cache`), YAML
validated with file:line errors (`yamlio`), `package.module:function` references (`refs`), the shipped data
files (`resources`), `--input-shape` parsing (`shapes`), tasks run serially or on Ray (`workers`). Import the
module you need; none imports torch."""

__all__: list[str] = []
