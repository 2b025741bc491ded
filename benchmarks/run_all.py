"""Re-run every benchmark, then regenerate RESULTS.md and the README table: `make bench`."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
STEPS = [
    ["lasso_overhead.py"],
    ["ssl_recipe.py", "--recipe", "lenet_ssl_full"],
    ["ssl_recipe.py", "--recipe", "mlp_ssl"],
    ["ssl_recipe.py", "--recipe", "rowlstm_iss"],
    ["iss_alternatives.py"],
    ["iss_lm.py", "--recipe", "kjv_lm_iss"],
    ["iss_lm.py", "--recipe", "kjv_lm_iss_650"],                # ~3.5 h at 1 thread
    ["iss_lm.py", "--recipe", "kjv_lm_iss_650_keep"],           # ~3.5 h at 1 thread
    ["iss_lm_control.py", "--recipe", "kjv_lm_iss_650_keep"],   # dense ~2 h + direct ~35 min at 2 threads
    ["iss_lm.py", "--recipe", "kjv_lm_iss_650_scratch"],        # ~90 min at 2 threads
    ["iss_lm_control.py", "--recipe", "kjv_lm_iss_650_scratch"],  # reuses _keep's controls where they train the same
    ["iss_lm.py", "--recipe", "kjv_lm_iss_650_long"],           # ~6 h at 2 threads (20 dense epochs, direct design)
    ["iss_lm.py", "--recipe", "kjv_lm_iss_650_long_kd", "--from", "kjv_lm_iss_650_long"],  # its fine-tuning only
    ["ssl_recipe.py", "--recipe", "lenet_lowrank"],
    ["ssl_recipe.py", "--recipe", "lenet_force_lowrank"],
    ["force_seeds.py"],                                        # 10 LeNet baselines
    ["ssl_recipe.py", "--recipe", "lenet_ssl_force_lowrank"],
    ["prox_vs_subgradient.py", "--recipe", "lenet_ssl"],
    ["ssl_vs_magnitude.py", "--recipe", "lenet_ssl_full"],
    ["ssl_recipe.py", "--recipe", "resnet20_depth"],          # ~70 min at 1 thread
    ["ssl_vs_magnitude.py", "--recipe", "resnet20_depth"],
    ["ssl_recipe.py", "--recipe", "resnet20_lowrank"],
    ["ssl_recipe.py", "--recipe", "resnet20_force_lowrank"],
    ["zoo_exactness.py"],
    ["zoo_speed.py"],
    ["zoo_timm_hf.py"],
    ["capture_speed.py"],
    ["gpt_kjv.py", "--recipe", "kjv_gpt_ssl"],                 # ~45 min at 2 threads
    ["codec_throughput.py"],
    ["terngrad_wire.py"],
    ["terngrad_convergence.py"],
    ["terngrad_speed.py"],
    # timing ~40 min; quality ~3 h, resumable: a second invocation keeps the modes already trained
    ["ddp_recipe.py", "--recipe", "lenet_ssl_full", "--scaling", "1", "2", "4", "--nodes", "2"],
    ["ddp_recipe.py", "--recipe", "kjv_lm_iss", "--workers", "2", "--grads", "fp32", "terngrad"],
    ["make_results.py"],
]


def main() -> None:
    for step in STEPS:
        print("==>", " ".join(step), flush=True)
        subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], check=True, cwd=HERE.parent)


if __name__ == "__main__":
    main()
