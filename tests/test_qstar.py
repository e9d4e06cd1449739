"""qstar.py: the spec test against a naive one-position-at-a-time reference, the fast path against the
dense masks (fp32 and fp64), rewards and REINFORCE by hand, documents kept apart, no special tokens in thoughts,
markers, the mixing head, gradients, a tiny overfit, and no tensor made on a default device."""

import pytest
import torch
from conftest import FavouriteTokensHead, tiny_model, word_tokenizer

import fast
from generate import sample_thoughts, thought_logits, token_scores
from machinery.hf_io import load_quietstar, save_quietstar
from qstar import (QuietStar, QuietStarConfig, advantages, at_streams, reinforce_loss, talk_targets,
                   thought_rewards)

V, B, T, L = 37, 2, 9, 3


def make_qstar(window=5, fast_paths=False, **overrides) -> QuietStar:
    cfg = QuietStarConfig(**dict(thought_len=L, n_true=3, n_thoughts=2) | overrides)
    qs = QuietStar(tiny_model(V, window=window), cfg, word_tokenizer(V - 1))    # "---" is token V - 1
    return fast.use(qs, fast_paths)


def naive_thought_logits(qs: QuietStar, tokens, thought_ids):
    """For each position on its own: x_0..x_i <start> c_1..c_L <end> through the plain causal model."""
    model, (start, end) = qs.model, qs.marker_embeddings()
    out = torch.empty(*tokens.shape, model.config.vocab_size, dtype=start.dtype)
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            embeds = torch.cat([model.embed(tokens[b, :i + 1]), start[None], model.embed(thought_ids[b, i]),
                                end[None]])[None]
            out[b, i] = model(embeds=embeds, positions=torch.arange(embeds.shape[1]))[0, -1]
    return out


@pytest.mark.parametrize("fast_paths", [True, False], ids=["fast", "dense"])
@pytest.mark.parametrize("window", [None, 4, 7], ids=["no-window", "window4", "window7"])
def test_parallel_thoughts_equal_naive_reference(fast_paths, window):
    qs = make_qstar(window=window, fast_paths=fast_paths)
    tokens, thought_ids = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T, L))
    with torch.no_grad():
        parallel, naive = thought_logits(qs, tokens, thought_ids), naive_thought_logits(qs, tokens, thought_ids)
    diff = (parallel - naive).abs().max().item()
    # logits <= ~1: fp32 sums of <= 40 terms through 2 layers, in another order (measured 3e-7); 1e-5 is ~30x
    # that. Thoughts shifted by one position move them by 1.1.
    assert diff <= 1e-5, f"parallel thoughts vs naive reference: max abs diff {diff:.2e}"


def loss_and_grads(qs, tokens, seed=5, thoughts=None):
    """thoughts: a dict. Empty, it records the thoughts sampled; filled, those thoughts are used again. Two paths
    whose logits differ in the last bits can sample differently (a token flips when u lands in the rounding gap)."""
    torch.manual_seed(seed)  # the same uniforms in every run
    if thoughts is not None:
        def think(tokens, cache, n_thoughts, thought_ids=None, at=None):
            ids, logp = QuietStar.think(qs, tokens, cache, n_thoughts, thoughts.get("ids"), at)
            thoughts.setdefault("ids", ids)
            return ids, logp
        qs.think = think
    try:
        qs.zero_grad()
        out = qs(tokens)
        out["loss"].backward()
    finally:
        qs.__dict__.pop("think", None)
    return out, {n: p.grad.clone() for n, p in qs.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fast_paths,checkpointing", [(True, False), (True, True), (False, True)])
def test_fast_path_and_checkpointing_equal_dense_reference(fast_paths, checkpointing):
    qs = make_qstar(window=4)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)   # a trained-looking head: every path live
    tokens, thoughts = torch.randint(0, V, (B, T)), {}
    ref_out, ref_grads = loss_and_grads(qs, tokens, thoughts=thoughts)
    fast.use(qs, fast_paths)
    qs.model.activation_checkpointing = checkpointing
    out, grads = loss_and_grads(qs, tokens, thoughts=thoughts)                # the same thoughts
    # fp32. Loss parts <= 3.8: the same means of terms that differ by a few roundings (~1e-6 at most; measured
    # 5e-7). Gradients <= 0.26: sums of ~250 contributions in another order, ~250 x 6e-8 x 0.26 = 4e-6 (measured
    # 1.9e-6): 3e-5. A sliding window off by one moves the losses by 4e-2 and the gradients by 9e-2.
    for key in ref_out:
        assert abs(out[key].item() - ref_out[key].item()) <= 1e-5, key
    assert grads.keys() == ref_grads.keys()
    diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in grads)
    assert diff <= 3e-5, f"gradients differ from the dense reference by {diff:.2e}"


def test_fast_path_and_checkpointing_equal_dense_reference_in_fp64():
    """In fp64 the three paths agree to rounding: loss parts and every gradient within 1e-12 (fp64 rounds at 1.1e-16:
    ~250-term sums of values <= 3.8 are off by < 1e-13; measured 2e-15), with the same thoughts."""
    qs = make_qstar(window=4).double()
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)
    tokens, thoughts = torch.randint(0, V, (B, T)), {}
    ref_out, ref_grads = loss_and_grads(qs, tokens, thoughts=thoughts)
    assert ref_out["loss"].dtype == torch.float64
    for fast_paths, checkpointing in ((True, False), (True, True)):
        fast.use(qs, fast_paths)
        qs.model.activation_checkpointing = checkpointing
        out, grads = loss_and_grads(qs, tokens, thoughts=thoughts)
        assert max(abs(out[k].item() - ref_out[k].item()) for k in ref_out) <= 1e-12
        assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads) <= 1e-12


def test_thought_rewards_by_hand():
    """N = 2 true tokens, T = 4 positions. The thought at i gains log p_talk(x_{i+1+u}) - log p_base(x_{i+1+u})."""
    talk = torch.tensor([[[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.25, 0.0, 0.0]]])  # (B*M=1, N=2, K=4), 0: no target
    # log p_base(x_1), (x_2), (x_3) = -1.5, -1.0, -4.0; row u holds the base log-prob of x_{i+1+u}
    base = torch.tensor([[[-1.5, -1.0, -4.0, 0.0], [-1.0, -4.0, 0.0, 0.0]]])
    scored = torch.tensor([[[True, True, True, False], [True, True, False, False]]])
    # i=0: (-1 + 1.5) + (-0.5 + 1.0) = 1.0; i=1: (-2 + 1) + (-0.25 + 4) = 2.75; i=2: -3 + 4 = 1; i=3: none
    assert thought_rewards(talk, base, scored).tolist() == [[1.0, 2.75, 1.0, 0.0]]
    scored[0, 1, 1] = False                                                  # x_3 after the thought at 1 is
    assert thought_rewards(talk, base, scored).tolist() == [[1.0, -1.0, 1.0, 0.0]]   # in the next document


def test_at_streams_by_hand():
    x = torch.tensor([[[10, 11, 12, 13], [20, 21, 22, 23]], [[30, 31, 32, 33], [40, 41, 42, 43]]])  # (B=2, 2, T=4)
    at = torch.tensor([[1, 3], [0, 2]])                                      # (B, K=2)
    assert at_streams(x, at).tolist() == [[[11, 13], [21, 23]], [[30, 32], [40, 42]]]


def test_advantages_by_hand():
    reward = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])                      # (B=1, M=2, T=2)
    assert advantages(reward, clip_negative=False).tolist() == [[[-1.0, -1.0], [1.0, 1.0]]]
    assert advantages(reward, clip_negative=True).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    one = torch.tensor([[[0.5, -0.5]]])                                      # M = 1: the raw gain, clipped
    assert advantages(one, clip_negative=True).tolist() == [[[0.5, 0.0]]]


def test_a_single_thought_still_learns():
    qs = make_qstar(n_thoughts=1)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)
    out, grads = loss_and_grads(qs, torch.randint(0, V, (B, T)))
    assert out["reinforce"] != 0 and grads["markers.stored"][0].abs().max() > 0


def test_a_thought_is_never_scored_on_the_next_document():
    """EOS (id 4) at index 4 of 7 tokens, N = 3. After the thought at i, x_{i+1+u} counts if it exists and no EOS
    lies in x_{i+1} .. x_{i+u}: predicting the EOS itself is fine, the tokens after it are another document."""
    tokens = torch.tensor([[7, 8, 9, 10, 4, 11, 12]])
    scored = talk_targets(tokens, torch.ones(1, 6, dtype=torch.bool), [4], n_true=3)
    expected = [[1, 1, 1, 1, 1, 1],        # u = 0: x_1 .. x_6, every next token
                [1, 1, 1, 0, 1, 0],        # u = 1: from i = 3, x_5 lies past the EOS x_4; i = 5 has no x_7
                [1, 1, 0, 0, 0, 0]]        # u = 2: from i = 2, x_5 ...; i = 4 (the EOS): x_7 does not exist
    assert scored.int().tolist() == [expected]
    padded = talk_targets(tokens, torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool), [], n_true=2)
    assert padded.int().tolist() == [[[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]]   # no EOS; x_6 is padding


def test_reinforce_by_hand():
    reward = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])          # (B=1, M=2, T=2); mean over M: [2, -1]
    logp = torch.tensor([[[-0.5, -1.0], [-2.0, -0.25]]], requires_grad=True)
    valid = torch.tensor([[[True, True]]])
    # advantages: thought 0: [-1, -1], thought 1: [+1, +1]. Sums of 4 small binary fractions in fp32: exact or a
    # rounding or two, far inside approx's default 1e-6 relative (and allclose's 1e-5 below); a sign error is 1e-1.
    assert advantages(reward, clip_negative=False).tolist() == [[[-1.0, -1.0], [1.0, 1.0]]]
    assert reinforce_loss(advantages(reward, False), logp, valid).item() == pytest.approx(-(0.5 + 1.0 - 2.0 - 0.25) / 4)
    clipped = reinforce_loss(advantages(reward, True), logp, valid)   # thought 0 -> 0
    assert clipped.item() == pytest.approx(2.25 / 4)
    clipped.backward()
    assert torch.allclose(logp.grad, torch.tensor([[[0.0, 0.0], [-0.25, -0.25]]]))
    only_first = reinforce_loss(advantages(reward, True), logp, torch.tensor([[[True, False]]]))
    assert only_first.item() == pytest.approx(1.0)


def test_reward_carries_no_gradient():
    # with the talk NLL weighted 0, the mixing head could only learn through the reward: it must not
    qs = make_qstar(base_loss_weight=1.0)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)
    _, grads = loss_and_grads(qs, torch.randint(0, V, (B, T)))
    assert all(not n.startswith("mixing_head") or g.abs().max() == 0 for n, g in grads.items())
    assert grads["model.layers.0.self_attn.q_proj.weight"].abs().max() > 0      # REINFORCE itself is live


def test_mixing_at_init_equals_base():
    qs = make_qstar()
    scores = token_scores(qs, torch.randint(0, V, (B, T)))
    assert torch.equal(scores["mix_weight"], torch.zeros(B, T - 1))
    assert torch.equal(scores["nll_mixed"], scores["nll_base"])
    out = qs(torch.randint(0, V, (B, T)))
    assert out["reward_mean"] == 0 and out["reinforce"] == 0                                   # token by token
    # the same 16 NLLs (~3.5) averaged over differently shaped tensors: fp32 rounding, 16 x 6e-8 relative at most
    assert out["nll_mixed"].item() == pytest.approx(out["nll_base"].item(), rel=1e-6)


def test_markers_start_from_the_chosen_token_and_survive_save_and_load(tmp_path):
    qs = make_qstar()
    assert qs.config.marker_init == "---"                                   # no em dash in this vocabulary
    start, end = qs.marker_embeddings()
    # stored / 100 and used * 100: equal up to two roundings, <= 2 x 6e-8 relative
    torch.testing.assert_close(start, qs.model.embed_tokens.weight[V - 1], rtol=1e-6, atol=0)
    assert torch.equal(end, start)
    with torch.no_grad():                                                   # "train" them
        qs.markers.stored.add_(torch.randn_like(qs.markers.stored))
        qs.mixing_head.net[-1].weight.normal_()
    trained = [t.clone() for t in qs.marker_embeddings()]
    save_quietstar(qs, tmp_path, word_tokenizer(V - 1))
    loaded, _ = load_quietstar(tmp_path)
    tokens = torch.randint(0, V, (B, T))
    loaded(tokens)                                                          # the official code re-inits here
    for a, b in zip(trained, loaded.marker_embeddings()):
        assert torch.equal(a, b)
    assert torch.equal(loaded.mixing_head.net[-1].weight, qs.mixing_head.net[-1].weight)
    assert loaded.config == qs.config
    thoughts = torch.randint(0, V, (B, T, L))      # the same weights and ops: equal but for a kernel's order (~1e-7)
    assert torch.allclose(thought_logits(loaded, tokens, thoughts), thought_logits(qs, tokens, thoughts), atol=1e-6)


@pytest.mark.parametrize("fast_paths", [False, True], ids=["plain", "fast"])
def test_gradients_reach_markers_mixing_head_and_trunk(fast_paths):
    qs = make_qstar(fast_paths=fast_paths)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)   # at exactly 0 no thought gets any reward
    _, grads = loss_and_grads(qs, torch.randint(0, V, (B, T)))
    for name, _ in qs.named_parameters():
        assert name in grads and grads[name].abs().max() > 0, f"no gradient reaches {name}"
    start_grad, end_grad = grads["markers.stored"]
    assert start_grad.abs().max() > 0 and end_grad.abs().max() > 0


def test_markers_are_parameters_outside_the_vocabulary():
    """Built once, by construction: the markers are their own (2, D) parameter; the embedding and the LM head
    keep their V rows, so no logit can ever name a marker (the official code adds two vocabulary rows)."""
    qs = make_qstar()
    assert qs.model.embed_tokens.num_embeddings == V and qs.model.lm_head.out_features == V
    assert qs.markers.stored.shape == (2, qs.model.config.dim)
    assert not any(p is qs.markers.stored for p in qs.model.parameters())


@pytest.mark.parametrize("fast_paths", [False, True], ids=["plain", "fast"])
def test_thoughts_never_contain_eos_or_special_tokens(fast_paths):
    tokenizer = word_tokenizer(V - 2)                                    # w0 .. w34, "---" = 35
    tokenizer.add_special_tokens(["<|sep|>"])                            # id 36
    model = tiny_model(V, window=None, eos_token_id=5)
    qs = fast.use(QuietStar(model, QuietStarConfig(thought_len=L, n_true=2), tokenizer), fast_paths)
    assert qs.banned_thought_ids.tolist() == [5, 36]
    model.lm_head = FavouriteTokensHead(model.config.dim, V, [5, 36])
    ids = sample_thoughts(qs, torch.randint(0, V, (B, T)))
    assert ids.shape == (B, T, L) and not torch.isin(ids, torch.tensor([5, 36])).any()
    out = qs(torch.randint(0, V, (B, T)))                                # the training path samples the same way
    assert torch.isfinite(out["loss"])


def test_thought_logits_rejects_wrong_shapes():
    qs = make_qstar()
    with pytest.raises(ValueError, match=r"thought_ids must be \(B, T, thought_len\)"):
        thought_logits(qs, torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T, L + 1)))


def test_a_few_steps_on_one_batch_lower_the_loss():
    qs = make_qstar()
    qs.train()
    tokens = torch.randint(0, V, (B, T))
    opt = torch.optim.AdamW(qs.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = qs(tokens)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    # this batch ends at 0.69 x the first loss, 10 other batches at 0.72-0.77 (sd 0.015); not learning stays at
    # 1.0. 0.85 lies between, > 5 sd from both.
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_parallel_thoughts_equal_naive_reference_on_the_real_model(dtype):
    """On SmolLM2-135M. In fp64 the two agree to rounding (~1e-13). In fp32, 30 layers of logits near 25
    carry rounding noise that the plain model shows against itself too (the same text run whole or
    prefix by prefix differs by ~7e-5), so the fp32 check is against that floor."""
    from machinery.hf_io import load_pretrained
    model, tok = load_pretrained("smollm2-135m", dtype=dtype)
    qs = QuietStar(model, QuietStarConfig(thought_len=4), tok)
    assert qs.config.marker_init == "\u2014"                                 # SmolLM2 has a one-token em dash
    tokens = torch.tensor([tok.encode("Q: Tom has 3 apples and buys 4 more. How many?").ids])
    thought_ids = torch.tensor([tok.encode(" 3 + 4 = 7").ids[:4]]).expand(tokens.shape[1], -1)[None]
    positions = [0, 5, tokens.shape[1] - 1]
    with torch.no_grad():
        parallel = thought_logits(qs, tokens, thought_ids)
        naive = naive_thought_logits(qs, tokens, thought_ids)
        whole = model(tokens)
        by_prefix = torch.cat([model(tokens[:, :i + 1])[:, -1:] for i in range(tokens.shape[1])], dim=1)
    diff = max((parallel[0, i] - naive[0, i]).abs().max().item() for i in positions)
    noise_floor = (whole - by_prefix).abs().max().item()
    print(f"{dtype}: parallel vs naive {diff:.2e}; plain model whole vs prefix-by-prefix {noise_floor:.2e}")
    if dtype == torch.float64:        # 1e-13 x a 1e4 margin; a wrong mask moves logits by O(1)
        assert diff <= 1e-9, f"parallel thoughts vs naive reference on SmolLM2 (fp64): {diff:.2e}"
    else:                             # the floor measured here, on this CPU; the thought passes add reorderings
        assert diff <= max(1e-5, 2 * noise_floor), f"fp32: {diff:.2e} vs noise floor {noise_floor:.2e}"


def test_sparse_embedding_gradients_equal_dense_ones():
    qs = make_qstar(window=None)
    torch.nn.init.normal_(qs.mixing_head.net[-1].weight, std=0.1)
    tokens = torch.randint(0, V, (B, T))
    _, dense = loss_and_grads(qs, tokens)
    fast.use(qs, False, sparse_embeddings=True)                   # only this twin
    _, sparse = loss_and_grads(qs, tokens)
    assert not sparse["model.embed_tokens.weight"].is_sparse
    # the same forward (the same thoughts); a row's gradient adds its <= ~100 lookups in another order: <= 100 x 6e-8
    # x 0.05 (measured 7e-9). A lookup's gradient lost is >= 1e-3.
    assert torch.allclose(sparse["model.embed_tokens.weight"], dense["model.embed_tokens.weight"], atol=1e-6)
