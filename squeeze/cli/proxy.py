"""`squeeze proxy check MODEL --method netadapt|amc --data D --candidates N`: does a cheap evaluation keep the
ranking of a search's candidates (EcoNAS)?"""

from __future__ import annotations

import json
from typing import Optional

import typer

from squeeze import api
from squeeze.cli.common import InputShape, TrustModel, Weights, handles_errors, model_options, out

app = typer.Typer(help="Cheap candidate evaluation (EcoNAS proxies): check that it keeps the ranking.",
                  no_args_is_help=True)


@app.command("check")
@handles_errors
def check(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    method: str = typer.Option("netadapt", "--method", "-m", help="Whose candidates: netadapt (one layer cut, "
                               "short fine-tune) or amc (whole policies, no fine-tune)."),
    data: str = typer.Option(..., "--data", help="The data the search will use (digits, fashion-mnist, a folder, ...)."),
    candidates: int = typer.Option(12, "--candidates", min=3, help="Candidates scored under every setting."),
    from_ratio: Optional[list[float]] = typer.Option(None, "--from-ratio", min=0.05, max=1.0,
                                                     help="NetAdapt: cut the candidates from the model with every "
                                                          "layer at this share of its channels (a late iteration's "
                                                          "starting point); repeat it for several depths. Default: "
                                                          "1 and 0.4 for NetAdapt, 1 for AMC."),
    seed: int = typer.Option(0, "--seed"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Fine-tune the candidates as Ray tasks "
                                          "on a local Ray of N CPUs (pip install 'squeeze\\[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="HOST:PORT of a running Ray cluster to "
                                              "fine-tune the candidates on."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON here (- for stdout)."),
) -> None:
    """Score candidates under the full evaluation and under each proxy; print Spearman's rho (95% interval),
    Kendall's tau, top-k overlap, how often the proxy keeps the best of an iteration's proposals (NetAdapt) and
    cost, and recommend the cheapest proxy that keeps the ranking at every depth checked."""
    from squeeze.report.render import proxy_view

    result = api.proxy_check(model, method, data, model_options(input_shape, weights, trust_model),
                             candidates=candidates, seed=seed, base_ratios=from_ratio, workers=workers,
                             ray_address=ray_address)
    if json_path == "-":
        print(json.dumps(result, indent=2))
        return
    if json_path:
        api.write_json(json_path, result)
    out.print(proxy_view(result))
