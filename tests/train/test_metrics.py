"""The trainer's console line (fla.train.metrics.MetricsLogger): fields, and extra metrics that keep their small
values (an L1 lambda at its 1e-9 floor must not print as 0.0)."""

import io

import torch

from fla.train.metrics import MetricsLogger, format_eta


def test_format_eta():
    assert format_eta(0) == "00:00:00"
    assert format_eta(3725.4) == "01:02:05"
    assert format_eta(-3) == "00:00:00"


def test_log_line_keeps_small_metrics():
    stream = io.StringIO()
    logger = MetricsLogger(total_steps=10, start_step=0, device=torch.device("cpu"), stream=stream,
                           flops_per_token=6e6, peak_flops=1e12)
    logger.add_tokens(1000)
    logger.log(3, 5.25, 3e-4, 1.5, {"lte/overall_sparsity": 0.123456789, "lte/l1_loss": 3.2e-10,
                                    "lte/overall_l1_lambda": 1e-9, "lte/count": 7})
    line = stream.getvalue().strip()
    fields = dict(f.split(" ", 1) for f in line.split(" | "))
    assert fields["step"] == "3/10" and fields["loss"] == "5.2500" and fields["gnorm"] == "1.500"
    assert fields["lte/overall_sparsity"] == "0.1235"
    assert float(fields["lte/l1_loss"]) == 3.2e-10
    assert float(fields["lte/overall_l1_lambda"]) == 1e-9
    assert fields["lte/count"] == "7"
    assert float(fields["mfu"]) > 0  # percent of the peak, from the tokens/s since the last line
