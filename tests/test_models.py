"""Model adapters: the layout found by structure, and blocks run alone == blocks inside the full forward."""

import pytest
from conftest import first_block_inputs
import torch
from torch import nn

from tlq_farm import block as B
from tlq_farm.calib.data import load_calibration, model_inputs
from tlq_farm.models.adapter import UnsupportedModel, find_layout, linear_names, load_model
from tlq_farm.models.tiny import ARCHS

EXPECTED = {
    "qwen2_vl": ("model.language_model.layers", "model.language_model.norm", "model.visual.blocks"),
    "qwen2_5_vl": ("model.language_model.layers", "model.language_model.norm", "model.visual.blocks"),
    "llava": ("model.language_model.layers", "model.language_model.norm", "model.vision_tower.encoder.layers"),
    "llava_next": ("model.language_model.layers", "model.language_model.norm", "model.vision_tower.encoder.layers"),
    "llava_onevision": ("model.language_model.layers", "model.language_model.norm", "model.vision_tower.encoder.layers"),
    "llama": ("model.layers", "model.norm", None),
    "qwen2": ("model.layers", "model.norm", None),
    "qwen3": ("model.layers", "model.norm", None),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_found_by_structure(tiny_models, arch):
    model, _ = load_model(str(tiny_models(arch)))
    lay = find_layout(model)
    assert (lay.blocks, lay.norm, lay.vision_blocks) == EXPECTED[arch]
    assert lay.head == "lm_head"


@pytest.mark.parametrize("arch", ARCHS)
def test_block_chain_equals_full_forward(tiny_models, calib_jsonl, arch):
    """Running block b alone on the chain of blocks 0..b-1 reproduces the input block b+1 sees in model()."""
    model, proc = load_model(str(tiny_models(arch)))
    lay = find_layout(model)
    blocks = lay.decoder_blocks(model)
    sample = load_calibration(calib_jsonl, proc, samples=1, seq_len=512, seed=0).samples[0]
    inside: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _a, out: inside.append(B.block_output(out).detach())) for blk in blocks]
    with torch.no_grad():
        model(**model_inputs(sample))
    for h in hooks:
        h.remove()
    cap = B.capture(model, blocks, model_inputs(sample))
    h = cap.hidden
    for b, blk in enumerate(blocks):
        with torch.no_grad():
            h = B.run_block(blk, h, cap.kwargs(b))
        torch.testing.assert_close(h, inside[b], rtol=1e-5, atol=1e-5)
    if lay.is_vlm:
        # Vision tokens are really in the sequence and the mask marks them.
        assert int(sample["vision_mask"].sum()) > 1


def test_true_sequential_groups_follow_the_data_flow(tiny_models, calib_jsonl):
    blocks, _, inputs = first_block_inputs(tiny_models("llama"), calib_jsonl, 1)
    groups = B.sequential_groups(blocks[0], inputs[0], linear_names(blocks[0]))
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_vision_tower_groups(tiny_models, calib_jsonl):
    vblocks, _, inputs = first_block_inputs(tiny_models("qwen2_vl"), calib_jsonl, 1, vision=True)
    groups = B.sequential_groups(vblocks[0], inputs[0], linear_names(vblocks[0]))
    assert groups == [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]


def test_kwargs_round_trip_through_flat_tensors(tiny_models, calib_jsonl):
    model, proc = load_model(str(tiny_models("qwen2_vl")))
    blocks = find_layout(model).decoder_blocks(model)
    sample = load_calibration(calib_jsonl, proc, samples=1, seq_len=512, seed=0).samples[0]
    cap = B.capture(model, blocks, model_inputs(sample))
    flat = B.flatten_kwargs(cap.kwargs(0))
    assert all(v is None or isinstance(v, torch.Tensor) for v in flat.values())
    assert any(isinstance(v, torch.Tensor) for v in flat.values())
    # Through the store's tensors (a kwarg passed as None stays None).
    from tlq_farm.steps import captured_to_tensors, kwargs_from_tensors

    sets, index = kwargs_from_tensors(captured_to_tensors(7, cap))[7]
    assert index == cap.kw_index
    back = sets[index[0]]
    assert back.keys() == cap.kwargs(0).keys()
    with torch.no_grad():
        torch.testing.assert_close(B.run_block(blocks[0], cap.hidden, back), B.run_block(blocks[0], cap.hidden, cap.kwargs(0)), rtol=0, atol=0)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def get_output_embeddings(self):
        return self.proj


def test_unsupported_model_names_the_class():
    with pytest.raises(UnsupportedModel, match="NoBlocks"):
        find_layout(NoBlocks())


def test_load_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_shared_input_statistics_equal_separate_ones(tiny_models, calib_jsonl):
    """q/k/v share one input: their statistics, computed once, equal each linear's computed alone."""
    blocks, samples, inputs = first_block_inputs(tiny_models("qwen2_vl"), calib_jsonl, 2)
    weights = [torch.rand(s["attention_mask"].numel(), generator=torch.Generator().manual_seed(i)) for i, s in enumerate(samples)]
    group = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    together = B.accumulate_stats(blocks[0], inputs, weights, group)
    for n in group:
        alone = B.accumulate_stats(blocks[0], inputs, weights, [n])[n]
        for key in alone:
            assert torch.equal(together[n][key], alone[key]), (n, key)
    # Per-projection weights (vlmq) must not be shared.
    per = {"self_attn.q_proj": weights, "*": [w * 0 + 1 for w in weights]}
    mixed = B.accumulate_stats(blocks[0], inputs, per, group)
    assert not torch.equal(mixed["self_attn.q_proj"]["H"], mixed["self_attn.k_proj"]["H"])
    assert torch.equal(mixed["self_attn.k_proj"]["H"], mixed["self_attn.v_proj"]["H"])


def test_read_config_accepts_decoders_by_kind_not_by_list(tmp_path):
    """A decoder-only type outside the tested list passes the gate (its structure decides after);
    encoders and encoder-decoders are refused with the tested types named."""
    import transformers

    from tlq_farm.models.adapter import SUPPORTED_MODEL_TYPES, UnsupportedModel, read_config

    mistral = tmp_path / "mistral"
    transformers.MistralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=64).save_pretrained(mistral)
    assert read_config(mistral).model_type == "mistral"
    for name, config in [("bert", transformers.BertConfig()), ("bart", transformers.BartConfig())]:
        config.save_pretrained(tmp_path / name)
        with pytest.raises(UnsupportedModel, match=rf"model_type '{name}' is not supported; tlq-farm quantizes "
                                                   rf"{', '.join(SUPPORTED_MODEL_TYPES)}: pass a checkpoint"):
            read_config(tmp_path / name)


@pytest.mark.parametrize("arch", ARCHS)
def test_embed_with_blocks_on_meta_records_what_the_full_forward_does(tmp_path, tiny_models, calib_jsonl, arch):
    """The embed task builds the prefix only (decoder blocks on the meta device, passed through): block 0's
    inputs and every block's kwargs equal those of the whole model's own forward, loaded from disk."""
    from tlq_farm import steps
    from tlq_farm.calib.data import load_calibration, model_inputs
    from tlq_farm.models.adapter import find_layout, load_model
    from tlq_farm.plan import Task
    from tlq_farm.spec import JobSpec, QuantSpec
    from tlq_farm.staging import stage_job
    from tlq_farm.store import LocalStore, keys
    from tlq_farm.store.tensors import get_tensors

    src = tiny_models(arch)
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, JobSpec(model=str(src), calib=str(calib_jsonl), samples=2, seq_len=512,
                                              quant=QuantSpec(group_size=32)))
    assert steps.execute(store, job, Task("embed", shard=0)) == "computed"
    ctx = steps.JobContext(store, job)
    prefix = ctx.prefix_model()
    blocks = ctx.layout.decoder_blocks(prefix)
    assert all(p.is_meta for p in blocks.parameters())
    head = ctx.layout.head + "."
    assert not any(p.is_meta for n, p in prefix.named_parameters()
                   if not n.startswith(ctx.layout.blocks + ".") and not n.startswith(head))
    assert all(p.is_meta for n, p in prefix.named_parameters() if n.startswith(head))

    model, proc = load_model(str(src))
    samples = load_calibration(str(calib_jsonl), proc, samples=2, seq_len=512, seed=0).samples
    full = [B.capture(model, find_layout(model).decoder_blocks(model), model_inputs(s)) for s in samples]
    acts = get_tensors(store, keys.acts(job, "q", 0, 0))
    kwargs = get_tensors(store, keys.block_kwargs(job, 0))
    want = {}
    for i, c in enumerate(full):
        # Samples of one shape share a forward of the prefix (capture_many): a batched product may round
        # differently from one sample's (1e-8 apart on an Intel Xeon with MKL, bit-equal on an AMD EPYC).
        torch.testing.assert_close(acts[f"s{i:06d}"], c.hidden, rtol=1e-5, atol=1e-6)
        want.update(steps.captured_to_tensors(i, c))
    assert sorted(kwargs) == sorted(want)
    assert all(torch.equal(kwargs[k], want[k]) for k in want)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_next", "llama"])
def test_samples_of_one_shape_share_a_prefix_forward_with_the_same_result(tiny_models, calib_jsonl, arch):
    """capture_many joins samples with identical input shapes into one forward of the prefix (as a processor
    batches them) and splits hidden states and kwargs back by sample: what one forward per sample gives."""
    model, proc = load_model(str(tiny_models(arch)))
    blocks = find_layout(model).decoder_blocks(model)
    samples = load_calibration(calib_jsonl, proc, samples=8, seq_len=512, seed=0).samples
    inputs = [model_inputs(s) for s in samples]
    shapes = [tuple(sorted((k, tuple(v.shape)) for k, v in x.items())) for x in inputs]
    assert len(set(shapes)) < len(shapes)  # some samples do share a forward
    together = B.capture_many(model, blocks, inputs)
    for x, got in zip(inputs, together):
        alone = B.capture(model, blocks, x, run_blocks=False)
        torch.testing.assert_close(got.hidden, alone.hidden, rtol=1e-5, atol=1e-6)
        assert got.kw_index == alone.kw_index
        for a, b in zip(got.kwargs_sets, alone.kwargs_sets):
            fa, fb = B.flatten_kwargs(a), B.flatten_kwargs(b)
            assert fa.keys() == fb.keys()
            for name in fa:
                if fb[name] is None:
                    assert fa[name] is None or name == "attention_mask"
                else:
                    torch.testing.assert_close(fa[name], fb[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_plans_traced_on_meta_are_the_plans_of_the_real_blocks(tmp_path, tiny_models, calib_jsonl, arch):
    """The groups task traces block 0 with its weights and the other blocks on the meta device where that
    gives block 0's plan: every block's plan equals its trace with weights, and the decoder's blocks after
    the first are never read from the store (Qwen-VL's vision blocks, whose attention reads its sequence
    lengths' values, are traced with their weights)."""
    from tlq_farm import steps
    from tlq_farm.spec import JobSpec, QuantSpec
    from tlq_farm.staging import stage_job
    from tlq_farm.store import keys
    from test_farm_support import CountingStore

    store = CountingStore(tmp_path / "store")
    vlm = EXPECTED[arch][2] is not None
    spec = JobSpec(model=str(tiny_models(arch)), calib=str(calib_jsonl), samples=2, seq_len=512,
                   quant=QuantSpec(group_size=32, quantize_vision=vlm))
    job, _ = stage_job(store, spec)
    assert not steps.run_embedded(store, job, max_tasks=1)  # the one embed shard
    ctx = steps.JobContext(store, job)
    towers = [None, "vision"] if vlm else [None]
    for tower in towers:
        sample = ctx.captured("fp" if tower is None else "q", 0, 0, tower)[0]
        store.reads = []
        plans = steps._block_plans(ctx, tower, sample)
        built = [k for k in store.reads if "staged/" in k and "block" in k]
        expected = [steps._traced_plan(ctx.block(b, tower=tower), sample.hidden, sample.kwargs(b), True)
                    for b in range(len(plans))]
        assert len(plans) == 2 and plans == expected
        if tower is None:
            assert built == [keys.staged_block(job, 0)]
