"""Tests for model.py: padding, KV-cache generation, sampling, Hugging Face checkpoint I/O, scalar head.
Run: python -m pytest -q tests/test_model.py"""
import io
import json
import re
import struct
import urllib.error
from pathlib import Path

import pytest
import torch

import model
from lab import weights
from model import GPT, GPTConfig, ScalarModel, response_mask, sample

TINY_HF = Path(__file__).resolve().parents[2] / "shared/data/tiny-gpt2-hf"
V = 257


def tiny(seed=0):
    """A 2-layer GPT with weight matrices 15x the GPT-2 init, so that greedy continuations vary
    (at std 0.02 the logits are almost uniform and greedy repeats one token)."""
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(15)
    return m


def left_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    idx = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return idx, mask


def right_pad(rows, pad=0):
    T = max(len(r) for r in rows)
    idx = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    return idx, mask


def hf_layout(m, prefix=True):
    """State dict the way Hugging Face stores GPT-2: Conv1D weights (in, out), no tied lm_head."""
    out = {}
    for k, v in m.state_dict().items():
        if k != "lm_head.weight":
            conv1d = k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
            out[k if prefix else k.removeprefix("transformer.")] = v.t() if conv1d else v
    return out


def write_safetensors_by_hand(path, tensors, dtype):
    """Independent writer (no alignment padding) so the reader is not only tested against its own writer."""
    name = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        blob = t.to(dtype).contiguous().view(view).numpy().tobytes()
        header[k] = {"dtype": name, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def assert_same_weights(a, b, dtype=torch.float32):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].to(dtype).float(), sb[k]), k


def test_forward_shape_logits_from_and_init():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, V, (3, 10))
    logits = m(idx)
    assert logits.shape == (3, 10, V)
    torch.testing.assert_close(m(idx, logits_from=7), logits[:, 7:], rtol=0, atol=1e-6)
    assert m.lm_head.weight is m.transformer.wte.weight
    # GPT-2 init: std 0.02, residual projections 0.02 / sqrt(2 * n_layer) = 0.01
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(m.transformer.h[0].mlp.c_proj.weight.std().item() - 0.01) < 0.001
    x = torch.linspace(-4, 4, 101)  # GPT-2's "gelu_new", the tanh approximation of GELU
    gelu_new = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(m.transformer.h[0].mlp.gelu(x), gelu_new, rtol=0, atol=1e-6)


def test_right_and_left_padding_give_the_unpadded_logits():
    m = tiny()
    short, long = torch.randint(1, V, (6,)).tolist(), torch.randint(1, V, (10,)).tolist()
    alone = m(torch.tensor([short]))[0]
    idx, mask = right_pad([short, long])
    torch.testing.assert_close(m(idx)[0, :6], alone, rtol=0, atol=1e-5)  # causal attention hides later pads
    with_mask = m(idx, attention_mask=mask)
    torch.testing.assert_close(with_mask[0, :6], alone, rtol=0, atol=1e-5)
    assert with_mask.isfinite().all()
    idx, mask = left_pad([short, long])
    left = m(idx, attention_mask=mask)
    torch.testing.assert_close(left[0, 4:], alone, rtol=0, atol=1e-5)
    assert left.isfinite().all()  # pad query rows see themselves: no all-masked rows, no NaN
    torch.testing.assert_close(left[1], m(torch.tensor([long]))[0], rtol=0, atol=1e-5)


def test_sdpa_mask_is_causal_hides_pads_and_never_masks_a_whole_row():
    keys = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = model.sdpa_mask(keys, 4)
    assert mask.shape == (2, 1, 4, 4) and mask.any(-1).all()
    expected = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    assert torch.equal(mask[0, 0].int(), expected)
    assert torch.equal(mask[1, 0], torch.ones(4, 4).tril().bool())
    assert torch.equal(model.sdpa_mask(keys, 1)[:, 0, 0], keys.bool())  # one new query: just the real keys


def test_kv_cache_greedy_equals_full_recompute():
    m = tiny()
    idx = torch.randint(0, V, (3, 5))
    out = m.generate(idx, 20, temperature=0)
    seq = idx
    for _ in range(20):  # slow reference: the whole sequence again for every token, no cache
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert len(set(out[:, 5:].flatten().tolist())) > 3  # a non-degenerate continuation


def test_left_padded_batch_generates_like_each_prompt_alone():
    m = tiny(seed=1)
    prompts = [torch.randint(1, V, (n,)).tolist() for n in (3, 7, 5)]
    idx, mask = left_pad(prompts)
    out = m.generate(idx, 12, temperature=0, attention_mask=mask)
    assert out.shape == (3, 7 + 12) and torch.equal(out[:, :7], idx)
    for row, p in zip(out, prompts):
        assert torch.equal(row[7:], m.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):])


def test_generate_rejects_sequences_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size 64"):
        tiny().generate(torch.zeros(1, 60, dtype=torch.long), 5)


def test_eos_rows_are_padded_after_and_response_mask():
    m = tiny(seed=2)
    idx = torch.randint(1, V, (4, 4))
    free = m.generate(idx, 16, temperature=0)
    eos = int(free[0, 4 + 5])  # row 0 emits this token at step 5 (or earlier)
    out = m.generate(idx, 16, temperature=0, eos_id=eos, pad_id=0)
    assert out.shape == (4, 20)
    ends = []
    for r in range(4):
        hits = (free[r, 4:] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 16  # response length including the EOS
        assert torch.equal(out[r, :4 + end], free[r, :4 + end]) and (out[r, 4 + end:] == 0).all()
        assert response_mask(out[:, 4:], eos)[r].tolist() == [True] * end + [False] * (16 - end)
        ends.append(end)
    assert ends[0] <= 6 and 16 in ends  # one row stopped early, another ran to the end


def test_response_mask_closed_form():
    new = torch.tensor([[5, 2, 7, 2], [5, 5, 5, 5], [2, 0, 0, 0], [0, 0, 2, 0]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]).bool()
    assert torch.equal(response_mask(new, eos_id=2), expected)


def test_generation_stops_early_when_every_row_is_done():
    m = tiny(seed=3)
    idx = torch.randint(1, V, (1, 4))
    free = m.generate(idx, 16, temperature=0)
    step = int((free[0, 4:] == free[0, 4 + 6]).nonzero()[0])  # first time row 0 emits that token
    calls = []
    m.transformer.ln_f.register_forward_hook(lambda *_: calls.append(1))  # one per forward: prefill + steps
    out = m.generate(idx, 16, temperature=0, eos_id=int(free[0, 4 + 6]), pad_id=0)
    assert len(calls) == step + 1 and out.shape == (1, 20)
    assert torch.equal(out[0, :5 + step], free[0, :5 + step]) and (out[0, 5 + step:] == 0).all()


def test_top_k_one_and_tiny_top_p_are_greedy_and_seeded_sampling_is_reproducible():
    m = tiny(seed=4)
    idx = torch.randint(0, V, (3, 5))
    greedy = m.generate(idx, 15, temperature=0)
    assert torch.equal(m.generate(idx, 15, top_k=1), greedy)
    assert torch.equal(m.generate(idx, 15, temperature=1.3, top_p=1e-6), greedy)
    a = m.generate(idx, 15, generator=torch.Generator().manual_seed(7))
    b = m.generate(idx, 15, generator=torch.Generator().manual_seed(7))
    c = m.generate(idx, 15, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, top_p=0.8, generator=g).tolist()) == {0, 1}  # smallest set reaching p
    assert set(sample(logits, top_p=0.81, generator=g).tolist()) == {0, 1, 2}
    freq = torch.bincount(sample(logits, generator=g), minlength=4) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), rtol=0, atol=0.03)
    freq = torch.bincount(sample(logits, top_k=2, generator=g), minlength=4) / 4000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0, 0]), rtol=0, atol=0.03)


def test_save_pretrained_round_trip(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_ctx"] == config["n_positions"] == 64
    stored = weights.read_safetensors(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and all(k.startswith("transformer.") for k in stored)
    assert stored["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D layout (in, out)
    loaded = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, V, (2, 9))
    assert torch.equal(loaded(idx), m(idx))
    assert_same_weights(m, loaded)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reads_half_precision_safetensors(tmp_path, dtype):
    m = tiny()
    m.save_pretrained(tmp_path)
    write_safetensors_by_hand(tmp_path / "model.safetensors", hf_layout(m), dtype)
    assert_same_weights(m, GPT.from_pretrained(tmp_path / "model.safetensors"), dtype)


def test_keys_without_prefix_and_pytorch_model_bin(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    weights.write_safetensors(hf_layout(m, prefix=False), tmp_path / "model.safetensors")
    assert_same_weights(m, GPT.from_pretrained(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    state = hf_layout(m, prefix=False)
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # buffers older HF versions saved
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()  # some checkpoints store the tied head too
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_weights(m, GPT.from_pretrained(tmp_path))
    state["lm_head.weight"] = state["lm_head.weight"] + 1  # an untied head would be dropped silently
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "pytorch_model.bin")) + ": lm_head.weight differs"):
        GPT.from_pretrained(tmp_path)


def test_corrupt_or_mismatched_checkpoints_name_the_file(tmp_path):
    m = tiny()
    m.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    header["transformer.wte.weight"]["data_offsets"][1] += 4
    bad_offsets = json.dumps(header).encode()
    for blob in (b"\x01\x02",  # too short for the header length
                 struct.pack("<Q", 10**12) + good[8:],  # header length past the end of the file
                 struct.pack("<Q", 9) + b"{not json" + good,
                 struct.pack("<Q", len(bad_offsets)) + bad_offsets + good[8 + n:]):
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ": corrupt safetensors header"):
            GPT.from_pretrained(tmp_path)
    path.write_bytes(good)
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                      "n_layer": 3}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + r": n_layer 3, .* imply \d+ "
                       r"parameters, model\.safetensors holds \d+"):  # refused before a model is built
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"activation_function": "relu"}))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json")) + ": activation_function relu"):
        GPT.from_pretrained(tmp_path)


class FakeResponse(io.BytesIO):
    def __init__(self, data, length=None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data) if length is None else length)}


def test_hub_download_is_cached_size_checked_and_fails_offline_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = tiny()
    m.save_pretrained(tmp_path / "served")
    requested = []

    def urlopen(url, timeout=None):
        requested.append(url)
        return FakeResponse((tmp_path / "served" / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(weights.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("MPO_CACHE", str(tmp_path / "cache"))
    loaded = GPT.from_pretrained("gpt2-medium")
    assert requested == [f"https://huggingface.co/gpt2-medium/resolve/main/{f}"
                         for f in ("config.json", "model.safetensors")]
    cached = sorted(p.name for p in (tmp_path / "cache/gpt2-medium").iterdir())
    assert cached == ["config.json", "model.safetensors"]
    assert_same_weights(m, loaded)
    GPT.from_pretrained("gpt2-medium")
    assert len(requested) == 2  # second load reads the cache

    def truncated(url, timeout=None):
        data = (tmp_path / "served" / url.rsplit("/", 1)[1]).read_bytes()
        return FakeResponse(data[:100], length=len(data))

    monkeypatch.setattr(weights.urllib.request, "urlopen", truncated)
    with pytest.raises(RuntimeError, match="downloaded 100 of"):
        GPT.from_pretrained("gpt2", cache_dir=tmp_path / "other")
    assert list((tmp_path / "other/gpt2").iterdir()) == []  # nothing half-written is left behind

    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as e:
        GPT.from_pretrained("gpt2-xl", cache_dir=tmp_path / "other")
    message = str(e.value)
    assert "\n" not in message and "config.json and model.safetensors" in message
    assert str(tmp_path / "other/gpt2-xl") in message


def test_scalar_model_scores_the_last_real_token():
    torch.manual_seed(0)
    rm = ScalarModel.from_gpt(tiny())
    rm.offset.fill_(1.5)
    rows = [torch.randint(1, V, (n,)).tolist() for n in (4, 9, 6)]
    alone = torch.stack([rm(torch.tensor([r]))[0, -1] for r in rows])
    for pad in (right_pad, left_pad):
        idx, mask = pad(rows)
        torch.testing.assert_close(rm.score(idx, mask), alone, rtol=0, atol=1e-5)
    rm.offset.zero_()
    torch.testing.assert_close(rm.score(*right_pad(rows)), alone + 1.5, rtol=0, atol=1e-5)
    rm.offset.fill_(1.5), rm.gain.fill_(2.0)  # normalised score = (head - offset) * gain
    torch.testing.assert_close(rm.score(*right_pad(rows)), 2 * alone, rtol=0, atol=1e-5)
    rm.gain.fill_(1.0)
    assert rm.head.weight.shape == (1, 32) and rm(torch.tensor(rows[:1])).shape == (1, 4)


def test_generated_tokens_can_enter_a_training_forward():
    m = tiny().train()
    out = m.generate(torch.randint(0, V, (2, 3)), 4)
    m(out).logsumexp(-1).mean().backward()  # an inference-mode tensor here would raise
    assert m.transformer.wte.weight.grad is not None


def test_scalar_model_from_gpt_copies_the_body():
    gpt = tiny()
    critic = ScalarModel.from_gpt(gpt)
    idx = torch.randint(0, V, (2, 7))
    assert torch.equal(critic.gpt.body(idx), gpt.body(idx))
    with torch.no_grad():
        critic.gpt.transformer.wte.weight.add_(1.0)
    assert not torch.equal(critic.gpt.body(idx), gpt.body(idx))  # a deep copy, not shared weights


def test_tiny_hf_checkpoint(tmp_path):
    if not TINY_HF.exists():
        pytest.skip(f"{TINY_HF} not present (the shared tiny Hugging Face GPT-2 checkpoint)")
    m = GPT.from_pretrained(TINY_HF)
    c = m.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (1, 1, 2, 1024, 50257)
    idx = torch.randint(0, 50257, (2, 8))
    logits = m(idx)
    assert logits.shape == (2, 8, 50257) and logits.isfinite().all()
    m.save_pretrained(tmp_path)
    assert torch.equal(GPT.from_pretrained(tmp_path)(idx), logits)
    original, ours = (weights.read_safetensors(d / "model.safetensors") for d in (TINY_HF, tmp_path))
    assert original.keys() == ours.keys() and all(torch.equal(original[k], ours[k]) for k in original)


def test_activation_checkpointing_keeps_fewer_activations_and_gives_the_same_loss_and_gradients():
    grads, saved = [], []
    for checkpointing in (False, True):
        m = tiny().train()
        m.config.grad_checkpoint = checkpointing
        idx = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
        count = []  # elements autograd keeps for the backward pass during the forward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            logits = m(idx[:, :-1])
        saved.append(sum(count))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert saved[1] < saved[0] / 2
    assert torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_generation_decodes_a_bf16_copy_and_leaves_the_model_fp32():
    m = tiny()
    idx = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(2))
    before = [p.clone() for p in m.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.generate(idx, 12, temperature=0)
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(m.parameters(), before))
    # Each bf16 greedy token is fp32's argmax up to bf16 rounding (8-bit mantissa): within 3% of the
    # logits' range of fp32's best logit at that position, given the same prefix.
    logits = m(out[:, :-1])[:, 5:]
    chosen = logits.gather(2, out[:, 6:, None]).squeeze(2)
    assert (logits.max(2).values - chosen).max() <= 0.03 * (logits.max() - logits.min())
    assert (chosen == logits.max(2).values).float().mean() > 0.5  # and mostly exactly it


def test_scalar_model_scores_in_fp32_under_bf16_autocast():
    rm = ScalarModel.from_gpt(tiny())
    idx, mask = right_pad([torch.randint(1, V, (n,)).tolist() for n in (4, 9)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score = rm.score(idx, mask)
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, rm.score(idx, mask), rtol=0, atol=0.1 * rm.score(idx, mask).abs().max().item())
