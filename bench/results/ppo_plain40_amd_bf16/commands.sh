# AMD EPYC (family 25, model 17), 2 cores, avx512_bf16, no AMX flags: bf16 compute. December 5 (thirteenth session).
HF_HUB_OFFLINE=1 /usr/bin/time -v python bench/learning_curve.py --recipe ppo --steps 20,40 --out OUT --base_eval START_EVAL -- --sft_dir none --reward verifier --response_length 128 --learning_rate 5e-4 --ppo_epochs 2 --critic shared --cpu_threads 2   # learning_curve.json, timing.txt
python eval/rescore.py START_EVAL OUT/eval-step-20 OUT/eval-step-40      # rescore.txt (START_EVAL: the plain model on the 320 prompts, the 280-step DPO curve's eval-base)
python bench/results/pipeline_amd_bf16/replies_side.py 40 60 replies_40_59.md start=START_EVAL ppo20=OUT/eval-step-20 ppo40=OUT/eval-step-40
