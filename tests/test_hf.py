"""Hugging Face checkpoints in and out, with `transformers` (and `peft`) as the test-only reference.

For each family (Llama incl. a SmolLM2-like GQA + tied config, Qwen2 with q/k/v biases and an
untied head, Qwen3 with q/k norms and head_dim != hidden/heads, GPT-2 with Conv1D weights) a tiny
RANDOM model is built by transformers (no download), saved with `save_pretrained` and loaded by
`checkpoint.load_model`; and the other way round, minipost's `save_model` output is loaded by
`AutoModelFor*.from_pretrained`. Tolerance 1e-4 on fp32 logits.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from minipost.checkpoint import CheckpointError, config_from_hf, load_model, save_model  # noqa: E402
from minipost.generate import generate  # noqa: E402
from minipost.hf import export_state_dict  # noqa: E402
from minipost.model import GPT, GPTConfig, ScoreModel  # noqa: E402

V = 96
PAD, BOS, EOS = 3, 1, 2
SPECIAL = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def hf_config(family: str):
    """A tiny transformers config of `family`."""
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 max_position_embeddings=64, **SPECIAL)
    if family == "smollm2":     # SmolLM2-135M's shape in small: Llama, GQA 3:1, tied embeddings
        return transformers.LlamaConfig(**{**small, "hidden_size": 48}, num_attention_heads=6,
                                        num_key_value_heads=2,
                                        head_dim=8, tie_word_embeddings=True, rope_theta=100000.0,
                                        rms_norm_eps=1e-5)
    if family == "llama":       # untied, no GQA, eos as a list (Llama 3 writes one)
        return transformers.LlamaConfig(**{**small, "eos_token_id": [EOS, 5]},
                                        num_attention_heads=4, tie_word_embeddings=False)
    if family == "qwen2":       # Qwen2.5: q/k/v biases, untied head, rope_theta 1e6, no sliding window
        return transformers.Qwen2Config(**small, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, rope_theta=1e6,
                                        use_sliding_window=False)
    if family == "qwen3":       # q/k RMSNorm, head_dim 16 != 32/4, tied
        return transformers.Qwen3Config(**small, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=16, tie_word_embeddings=True)
    if family == "gpt2":        # Conv1D weights, fused c_attn, learned positions, n_inner=None
        return transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, n_inner=None, **SPECIAL)
    raise ValueError(family)


FAMILIES = ["smollm2", "llama", "qwen2", "qwen3", "gpt2"]


def randomise(model, seed=0):
    """Every parameter (norm weights and biases too) far from its init, so a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if p.ndim == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def make_hf(family, auto="AutoModelForCausalLM", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = hf_config(family)
    if auto == "AutoModelForSequenceClassification":
        cfg.num_labels = 1
    return randomise(getattr(transformers, auto).from_config(cfg, **kw), seed)


def batch():
    """A left-padded batch (3, 9): rows of 9, 5 and 1 real tokens, pad id on the padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def hf_logits(model, ids, mask):
    """transformers' logits for a left-padded batch: positions from the mask, as minipost does."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def assert_close_on_real_tokens(got, want, mask):
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- HF -> minipost

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_checkpoint_gives_the_same_logits_on_a_left_padded_batch(family, tmp_path):
    hf = make_hf(family)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids, mask = batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    assert_close_on_real_tokens(got, hf_logits(hf, ids, mask), mask)


def test_older_config_format_without_head_dim_and_rope_parameters_loads(tmp_path):
    # transformers 4 configs: `rope_theta` + `rope_scaling: null`, `torch_dtype`, no head_dim
    hf = make_hf("qwen2")
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d.update(rope_scaling=None, torch_dtype=d.pop("dtype"))
    d.pop("head_dim", None)
    d.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = load_model(tmp_path).eval()
    assert ours.config.rope_theta == 1e6 and ours.config.head_dim == 8
    ids, mask = batch()
    with torch.no_grad():
        assert_close_on_real_tokens(ours(ids, attention_mask=mask), hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_equals_transformers_generate(family, tmp_path):
    hf = make_hf(family)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    ids, mask = batch()
    n = 8
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, eos_token_id=None, pad_token_id=PAD)[:, ids.shape[1]:]
    got = generate(ours, (ids, mask), max_new_tokens=n, temperature=0, pad_token_id=PAD)
    assert torch.equal(got.completion_ids, want)                     # batched, left-padded
    for i in range(len(ids)):                                       # each prompt alone
        prompt = ids[i][mask[i].bool()].tolist()
        alone = generate(ours, [prompt], max_new_tokens=n, temperature=0, pad_token_id=PAD)
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=PAD)
        assert alone.completion_ids[0].tolist() == ref[0, len(prompt):].tolist() == want[i].tolist()


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("qwen3")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_model(tmp_path).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert_close_on_real_tokens(ours(ids, attention_mask=mask), hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_into_the_requested_dtype(saved, tmp_path):
    hf = make_hf("smollm2").to(saved)
    hf.save_pretrained(tmp_path)
    want = {k: v.float() for k, v in hf.state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        ours = load_model(tmp_path, dtype=dtype)
        assert {p.dtype for p in ours.parameters()} == {dtype}
        if dtype == torch.float32:                                   # upcast exactly
            for k, v in ours.state_dict().items():
                assert torch.equal(v, want[k]), k
    assert {p.dtype for p in load_model(tmp_path).parameters()} == {torch.float32}  # default fp32


def test_hf_sequence_classification_loads_as_a_score_model(tmp_path):
    hf = make_hf("qwen2", auto="AutoModelForSequenceClassification")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, head="score").eval()
    ids, mask = batch()
    with torch.no_grad():   # HF reads the score at the last non-pad token: right for left padding
        want = hf(input_ids=ids, attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
        got = ours.score_last(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- minipost -> HF

def minipost_config(family):
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=64, **SPECIAL)
    return {
        "smollm2": lambda: GPTConfig(**{**kw, "hidden_size": 48}, num_attention_heads=6,
                                     num_key_value_heads=2, rope_theta=100000.0),
        "llama": lambda: GPTConfig(**kw, num_attention_heads=4, tie_word_embeddings=False),
        "qwen2": lambda: GPTConfig(model_type="qwen2", **kw, num_attention_heads=4,
                                   num_key_value_heads=2, attention_bias=True, rope_theta=1e6,
                                   rms_norm_eps=1e-6, tie_word_embeddings=False),
        "qwen3": lambda: GPTConfig(model_type="qwen3", **kw, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, qk_norm=True,
                                   rms_norm_eps=1e-6),
        "gpt2": lambda: GPTConfig.gpt2(**kw, num_attention_heads=4),
    }[family]()


@pytest.mark.parametrize("family", FAMILIES)
def test_minipost_export_loads_in_transformers_with_the_same_logits(family, tmp_path):
    torch.manual_seed(0)
    ours = randomise(GPT(minipost_config(family)))
    save_model(ours, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info        # no missing, unexpected or mismatched weights
    hf.eval()
    assert hf.config.tie_word_embeddings == ours.config.tie_word_embeddings
    ids, mask = batch()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    assert_close_on_real_tokens(got, hf_logits(hf, ids, mask), mask)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_score_model_export_loads_as_sequence_classification(family, tmp_path):
    torch.manual_seed(0)
    ours = randomise(ScoreModel(minipost_config(family)))
    save_model(ours, tmp_path)
    hf, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert hf.config.num_labels == 1 and type(hf).__name__.endswith("ForSequenceClassification")
    ids, mask = batch()
    with torch.no_grad():
        want = hf.eval()(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
        got = ours.score_last(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bf16_export_records_its_dtype_and_transformers_reads_it(tmp_path):
    torch.manual_seed(0)
    ours = randomise(GPT(minipost_config("qwen3"))).to(torch.bfloat16)
    save_model(ours, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["dtype"] == d["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert hf.dtype == torch.bfloat16


# ---------------------------------------------------------------- PEFT on an imported model

def test_lora_on_an_imported_qwen3_loads_in_peft_with_the_same_logits(tmp_path):
    # tests/test_lora.py proves the adapter format on a Llama built in place; this is the
    # round trip a user makes: HF checkpoint -> minipost LoRA -> peft on the original model.
    peft = pytest.importorskip("peft")
    from minipost.lora import apply_lora
    from minipost.peft_format import save_lora
    from test_lora import train_like
    hf = make_hf("qwen3")
    hf.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base").eval()
    train_like(apply_lora(ours, r=4, alpha=8))
    save_lora(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    ref = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids, mask = batch()
    with torch.no_grad():
        assert_close_on_real_tokens(ours(ids, attention_mask=mask), hf_logits(ref, ids, mask), mask)


# ---------------------------------------------------------------- bad directories

def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    make_hf("llama").save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, "model_type": "mistral"}))
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'mistral'; supported: "
                                              r"llama, qwen2, qwen3, gpt2"):
        load_model(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0}},
     "rope_type 'llama3'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rope_type 'yarn'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_llama_features_are_refused_by_name(change, match, tmp_path):
    make_hf("llama").save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(change)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path)


def test_qwen2_sliding_window_is_refused(tmp_path):
    make_hf("qwen2").save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d.update(use_sliding_window=True, sliding_window=16)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="sliding"):
        load_model(tmp_path)


def test_missing_files_are_named(tmp_path):
    make_hf("qwen3").save_pretrained(tmp_path / "one")
    (tmp_path / "one" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "one")
    make_hf("qwen3").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard.name}"):
        load_model(tmp_path / "sharded")


def test_weight_of_the_wrong_shape_is_named(tmp_path):
    make_hf("qwen2").save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape"):
        load_model(tmp_path)


# ---------------------------------------------------------------- real models' config.json

# The fields of the Hub config.json files that matter (docs/real_models.md quotes these counts).
REAL_CONFIGS = {
    "SmolLM2-135M-Instruct": (134_515_008, dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        max_position_embeddings=8192, rope_theta=100000, rope_scaling=None, rms_norm_eps=1e-5,
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, torch_dtype="bfloat16")),
    "Qwen2.5-0.5B-Instruct": (494_032_768, dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True, use_sliding_window=False,
        sliding_window=32768, max_window_layers=21, bos_token_id=151643, eos_token_id=151645,
        torch_dtype="bfloat16")),
    "Qwen3-0.6B": (596_049_920, dict(
        model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000,
        rope_scaling=None, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
        tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
        eos_token_id=151645, torch_dtype="bfloat16")),
    "gpt2": (124_439_808, dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257, n_embd=768,
        n_layer=12, n_head=12, n_positions=1024, n_ctx=1024, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=50256,
        eos_token_id=50256)),
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_model_configs_map_to_transformers_parameter_count(name):
    n_params, d = REAL_CONFIGS[name]
    with torch.device("meta"):      # shapes only: no memory, no download
        ours = GPT(config_from_hf(d))
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
    exported = export_state_dict(ours.config, ours.state_dict())   # HF names (GPT-2: Conv1D)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == n_params


# ---------------------------------------------------------------- a stage script on an HF checkpoint

def qwen_style_init(path):
    """A tiny HF Qwen2 checkpoint in bf16 with a Qwen-style tokenizer config (bos null)."""
    from minipost import tasks
    from minipost.tokenizer import train_tokenizer
    tok = train_tokenizer(tasks.pretrain_corpus(300), vocab_size=300)
    cfg = hf_config("qwen2")
    cfg.vocab_size, cfg.bos_token_id, cfg.pad_token_id = 320, None, 0   # padded vocab, as Qwen's
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save(str(path))
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc.update(bos_token=None, pad_token="<|endoftext|>", tokenizer_class="Qwen2Tokenizer")
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return path


SFT_TINY = dict(max_steps=3, batch_size=4, n_train=40, eval_every=0, eval_problems=0,
                eval_chats=4, eval_quick=0, threads=1, device="cpu", warmup_steps=1, max_length=128)


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_train_sft_post_trains_an_hf_checkpoint_that_transformers_then_loads(peft, tmp_path):
    # docs/real_models.md: `--init DIR --dtype bfloat16`, then AutoModelForCausalLM / PeftModel
    import train_sft
    init = qwen_style_init(tmp_path / "init")
    out = tmp_path / "sft"
    train_sft.main(train_sft.Args(init=str(init), out_dir=str(out), dtype="bfloat16", peft=peft,
                                  lr=1e-2, **SFT_TINY))
    from minipost.peft import load_model as load_output
    ours = load_output(out, dtype=torch.float32).eval()  # a LoRA output loads merged
    if peft == "lora":
        peft_lib = pytest.importorskip("peft")
        base = transformers.AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
        hf = peft_lib.PeftModel.from_pretrained(base, str(out)).eval()
    else:
        assert transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == (
            torch.bfloat16)                                # the dtype it was trained in
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = batch()
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf_logits(hf, ids, mask).float()
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    with torch.no_grad():                                # and training did change the model
        before = load_model(init, dtype=torch.float32).eval()(ids, attention_mask=mask)
    assert (got - before)[real].abs().max() > 1e-2
