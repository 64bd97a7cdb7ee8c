#!/usr/bin/env bash
# GRPO on VisGen with verl 0.9.1 (needs a GPU node and verl installed, which pins transformers<5.11:
# use an environment of its own). Not run by visenv's tests; see visenv/integrations/verl.py.
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
python examples/verl/make_data.py --out data/visenv
python -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  data.train_files=data/visenv/train.parquet data.val_files=data/visenv/val.parquet \
  data.train_batch_size=32 data.max_prompt_length=4096 data.max_response_length=4096 \
  data.return_raw_chat=True \
  actor_rollout_ref.model.path="$MODEL" \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.mode=async actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.multi_turn.enable=True \
  actor_rollout_ref.rollout.multi_turn.format=hermes \
  actor_rollout_ref.rollout.multi_turn.max_assistant_turns=8 \
  actor_rollout_ref.rollout.agent.agent_loop_config_path=examples/verl/agent_loops.yaml \
  trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_epochs=1 trainer.logger=console "$@"
