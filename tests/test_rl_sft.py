"""SFT/PST: data mixing by hand, loss only on assistant tokens, JSONL errors, the tokenizer."""

import json
import random

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rl.policy import ENV, POLICY, TokenBatch
from rl.sft import SFTStage, chat_segments, length_batches, load_chat_jsonl, mix, run_pst, train_sft
from rl.tokenizer import load_tokenizer, train_tokenizer
from rl_helpers import echo_examples, echo_tokenizer, tiny_policy


def test_mix_by_hand():
    general, visual = [f"g{i}" for i in range(10)], ["v0", "v1", "v2", "v3"]
    mixed = mix(general, visual, general_count=3, visual_weight=2.5, rng=random.Random(0))
    # 3 general + 2 whole copies of the 4 visual + half of them once more = 3 + 8 + 2
    assert len(mixed) == 13
    assert sum(x.startswith("g") for x in mixed) == 3 and len({x for x in mixed if x.startswith("g")}) == 3
    counts = sorted(mixed.count(v) for v in visual)
    assert counts == [2, 2, 3, 3]
    assert len(mix(general, visual, 50, 0.0, random.Random(0))) == 10  # all general, no visual
    with pytest.raises(ValueError, match=r"visual_weight \(-1\)"):
        mix(general, visual, 1, -1, random.Random(0))


def test_chat_segments_train_only_on_assistant_tokens():
    tokenizer = echo_tokenizer()
    policy = tiny_policy(tokenizer)
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Turn 0: say cat."},
                {"role": "assistant", "content": "cat"}, {"role": "tool", "content": "ok"},
                {"role": "user", "content": "Turn 1: say robot."}, {"role": "assistant", "content": "robot"}]
    segments = chat_segments(policy, messages)
    assert [s.role for s in segments] == [ENV, POLICY, ENV, POLICY]
    assert segments[0].text == "<|system|>Be exact.<|end|><|env|>Turn 0: say cat.<|end|><|agent|>"
    assert segments[2].text == "<|env|>ok\nTurn 1: say robot.<|end|><|agent|>"
    assert segments[1].token_ids == tokenizer.encode("cat") + [policy.stop_id]
    batch = TokenBatch.from_segments([segments], policy.pad_id)
    trained = batch.input_ids[0][batch.loss_mask[0].bool()].tolist()
    assert trained == segments[1].token_ids + segments[3].token_ids


def test_load_chat_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:3: the trajectory has no assistant message"):
        load_chat_jsonl(str(path))
    path.write_text(json.dumps(good) + "\nnot json\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2: expected a JSON object"):
        load_chat_jsonl(str(path))
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"message 0 must have a role"):
        load_chat_jsonl(str(path))
    path.write_text(json.dumps(good) + "\n")
    assert load_chat_jsonl(str(path)) == [good["messages"]]


def test_length_batches_cover_every_index_once_with_similar_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53]
    batches = length_batches(lengths, 4, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [[5, 6, 7, 8], [50, 51, 52, 53]]


def test_sft_lowers_the_loss_and_pst_runs_stages(tmp_path):
    torch.set_num_threads(1)
    policy = tiny_policy(echo_tokenizer())
    examples = echo_examples(256, correct_share=1.0)
    first = train_sft(policy, examples[:32], epochs=1, batch_size=32, learning_rate=3e-3, seed=0)["loss"]
    last = train_sft(policy, examples, epochs=3, batch_size=32, learning_rate=3e-3, seed=0)["loss"]
    assert last < first / 2
    general, visual = tmp_path / "general.jsonl", tmp_path / "visual.jsonl"
    general.write_text("".join(json.dumps({"messages": e}) + "\n" for e in echo_examples(20, 0.0, seed=1)))
    visual.write_text("".join(json.dumps({"messages": e}) + "\n" for e in examples[:8]))
    stages = [SFTStage(str(visual), str(general), general_count=16, visual_weight=1.0, batch_size=8),
              SFTStage(str(visual), str(general), general_count=4, visual_weight=2.0, batch_size=8)]
    results = run_pst(policy, stages, seed=0)
    assert [r["steps"] for r in results] == [3.0, 3.0]  # 24 then 20 examples in batches of 8
    with pytest.raises(ValueError, match=r"general_count \(5\) needs a general dataset"):
        SFTStage(str(visual), general_count=5)


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tmp_path):
    texts = ["<tool_call>{\"name\": \"tool_text2image_qwen\"}</tool_call>", "Call tool_text2image_qwen now."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == 0
    assert tokenizer.tokenize("<|env|>hi<|end|>")[0] == "<|env|>"
    odd = "ünïcode\ttabs  and 𝄞"
    assert tokenizer.decode(tokenizer.encode(odd)) == odd
    tokenizer.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert isinstance(loaded, PreTrainedTokenizerFast) and loaded.encode(texts[0]) == tokenizer.encode(texts[0])
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be at least 262"):
        train_tokenizer(texts, vocab_size=100)


def test_tokenizer_id_pairs_split_every_artifact_id_into_six_known_pairs(tmp_path):
    texts = ['{"id": "img_3f2a9c01d4e7", "kind": "image"}', "Delivered: img_3f2a9c01d4e7", "tool_edit feed"] * 20
    plain, paired = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300, id_pairs=True)
    pairs = [a + b for a in "0123456789abcdef" for b in "0123456789abcdef"]
    vocab = paired.get_vocab()
    assert all(p in vocab for p in pairs) and len(paired) == len(set(vocab.values())) <= 300 + 256
    unseen = "Delivered: img_c0ffee12ab9d and vid_00ff00ff00ff."
    tokens = paired.tokenize(unseen)
    for body in ("c0ffee12ab9d", "00ff00ff00ff"):  # an id never seen in training: still six pair tokens
        at = next(i for i, t in enumerate(tokens) if t.endswith("_") and "".join(tokens[i + 1:i + 7]) == body)
        assert tokens[at + 1:at + 7] == [body[k:k + 2] for k in range(0, 12, 2)]
    assert len(plain.tokenize(unseen)) > len(tokens)  # without pairs: single digits and a few merges
    for text in (unseen, "no id: img_abc, img_3f2a9c01d4e7f, word_feedface", *texts):
        assert paired.decode(paired.encode(text)) == text
    # hex outside an id (too short, too long, no underscore) is not cut into pairs before the BPE
    pieces = paired.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    assert [p for p, _ in pieces("img_abc img_3f2a9c01d4e7f feedface")] == ["img_abc", "Ġimg_3f2a9c01d4e7f",
                                                                           "Ġfeedface"]
    assert [p for p, _ in pieces("img_3f2a9c01d4e7")] == ["img_", "3f", "2a", "9c", "01", "d4", "e7"]
    paired.save_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).encode(unseen) == paired.encode(unseen)
