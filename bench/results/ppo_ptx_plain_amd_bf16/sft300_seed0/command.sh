python bench/learning_curve.py --lr_scheduler linear --recipe ppo --steps 0,40,50 --out OUT -- --config recipes/configs/ppo_ptx_plain.yaml --sft_dir none --sft_steps 300 --cpu_threads 2 --seed 0
