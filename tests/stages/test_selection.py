import torch

from besa.stages.selection import InputNormStats, wanda_scores


def test_input_norm_stats_accumulate_the_column_norms_over_batches():
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, 5, 8), torch.randn(3, 4, 8)
    stats = InputNormStats(8, torch.device("cpu"))
    stats.add(x1)
    stats.add(x2)
    expected = torch.cat([x1.reshape(-1, 8), x2.reshape(-1, 8)]).norm(dim=0)
    torch.testing.assert_close(stats.norms, expected)
    assert stats.tokens == 22


def test_wanda_scores_are_abs_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
    norms = torch.tensor([10.0, 0.5])
    assert wanda_scores(w, norms).tolist() == [[10.0, 1.0], [30.0, 2.0]]
