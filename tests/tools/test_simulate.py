"""The simulated accelerator on matrices whose cycle counts are worked out by hand (64 x 64 PEs = 4096 MACs a
cycle)."""

import torch

from besa.tools.simulate import dense_cycles, engine_cycles, patch_cycles, simulate_model, weight_cycles
from conftest import make_model


def test_dense_baselines_charge_the_rows_of_the_weight():
    # LLaMA-7B, the paper's "Dense Runtime": q/k/v/o 4096 x 4096 -> 4096 cycles
    assert dense_cycles(4096, 4096) == 4096
    # gate/up 11008 x 4096: 11008 * 4096 / 4096 = 11008 (the reference charged C_in rows: 4096, 2.7x too few)
    assert dense_cycles(11008, 4096) == 11008
    # down 4096 x 11008: patches of 4096, 4096 and 2816 columns -> 4096 + 4096 + 2816 (the reference: 1936 last)
    assert dense_cycles(4096, 11008) == 11008
    assert dense_cycles(128, 320) == 4 + 4 + 2  # 128 x 128, 128 x 128, 128 x 64


def test_a_full_matrix_costs_its_dense_baseline():
    keep = torch.ones(128, 128, dtype=torch.bool)
    assert weight_cycles(keep) == dense_cycles(128, 128) == 4
    tall = torch.ones(256, 64, dtype=torch.bool)  # more rows than columns: one patch, 256 * 64 / 4096
    assert weight_cycles(tall) == 4


def test_a_diagonal_goes_to_the_sparse_engine():
    # 256 nonzeros, one per column: no column is dense at any threshold tried above 0 -> ceil(256 / 4096) = 1
    keep = torch.eye(256, dtype=torch.bool)
    assert weight_cycles(keep) == 1 and dense_cycles(256, 256) == 16


def test_a_split_between_the_engines_by_hand():
    # 32 full columns (128 nonzeros each) and 96 columns of 8: E = 4096 + 768, D / E = 0.842 at t = 0.5
    # -> dense width int(64 * 0.842) = 53, sparse 11; dense ceil(128 * 32 / (53 * 64)) = 2,
    #    sparse ceil(768 / (11 * 64)) = 2 -> 2 cycles; later thresholds give 2 as well (sparse only: ceil(4864/4096))
    keep = torch.zeros(128, 128, dtype=torch.bool)
    keep[:, :32] = True
    keep[:8, 32:] = True
    assert engine_cycles(128, 32, 768, 4096 / 4864) == 2
    assert patch_cycles(keep) == 2 and dense_cycles(128, 128) / weight_cycles(keep) == 2.0


def test_wide_weights_add_up_their_patches():
    keep = torch.zeros(64, 192, dtype=torch.bool)
    keep[:, :64] = True  # first patch full: 1 cycle; the other two empty: 0
    assert weight_cycles(keep) == 1 and dense_cycles(64, 192) == 3


def test_engines_without_columns_and_empty_weights():
    assert engine_cycles(64, 0, 0, 0.0) == 0
    assert engine_cycles(64, 4, 0, 0.0) == float("inf")  # dense work but no dense PE column
    assert weight_cycles(torch.zeros(64, 64, dtype=torch.bool)) == 0


def test_simulate_model_reports_every_layer_type():
    model = make_model("llama")
    sim = simulate_model(model)
    assert set(sim["by_type"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
    for entry in sim["by_type"].values():
        assert entry["layers"] == 2 and entry["cycles"] == entry["dense_cycles"]  # nothing pruned: no gain
