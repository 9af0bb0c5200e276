"""Fine-tune a causal LM on pre-tokenised text + image-token sequences (full weights or LoRA).

    unimodal finetune --config finetune_smollm2_lora                                   # installed
    accelerate launch --config_file "$(unimodal configs accelerate/zero2)" \
        -m unimodal.recipes.finetune --config finetune_smollm2_lora --max_steps 500
    python recipes/finetune.py --config examples/digits/finetune.yaml \
        --tokenizer_name_or_path outputs/digits-demo/text-tokenizer \
        --dataset_path outputs/digits-demo/lm/data                                    # from a clone
    accelerate launch --config_file recipes/configs/accelerate/zero2.yaml \
        recipes/finetune.py --config recipes/configs/finetune_smollm2_lora.yaml

Relaunching the same command resumes from the latest checkpoint in ``output_dir/checkpoints``
with the data order continued. The result, ``output_dir/final``, loads with
``AutoModelForCausalLM.from_pretrained`` + ``UnimodalProcessor.from_pretrained`` (a unified base,
e.g. Chameleon: with its own transformers class; docs/bases/).
Config reference: docs/finetune.md; launchers: docs/distributed.md.
"""

import dataclasses
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unimodal.data import UnimodalCollator, make_dataloader
from unimodal.errors import UserError, bad_input
from unimodal.extend import check_compatibility
from unimodal.finetune import (
    DataArguments,
    FinetuneArguments,
    LoraArguments,
    ModelArguments,
    evaluate,
    load_data_processor,
    load_task_data,
    prepare_model,
    save_samples,
)
from unimodal.generation import SamplingConfig
from unimodal.hub import push_folder_to_hub
from unimodal.outputs import save_finetuned
from unimodal.training import (
    LOSS_METHODS,
    CheckpointManager,
    Preemption,
    Throughput,
    adamw,
    batch_loss,
    check_finite,
    check_step_in_backward,
    continued_micro_step,
    cosine_with_warmup,
    infinite_batches,
    make_accelerator,
    parse_config,
    return_large_blocks_to_the_system,
    step_in_backward,
    weights_sharded,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> Path:
    model_args, data_args, lora_args, args = parse_config(
        (ModelArguments, DataArguments, LoraArguments, FinetuneArguments), argv, prog=prog, description=__doc__)
    out = Path(args.output_dir)
    # One set of text-to-image settings: the in-training samples use them and final/ keeps them.
    with bad_input("sample_guidance_scale / sample_temperature / sample_top_k / sample_top_p"):
        sampling = SamplingConfig(guidance_scale=args.sample_guidance_scale, temperature=args.sample_temperature,
                                  top_k=args.sample_top_k, top_p=args.sample_top_p)
    if args.loss not in LOSS_METHODS:
        raise UserError(f"loss must be one of {LOSS_METHODS}, got {args.loss!r}")
    if lora_args.use_lora and not args.merge_lora and not model_args.model_name_or_path:
        raise UserError("merge_lora=false saves an adapter on top of a base others can load; "
                        "a model built from a config has none: set model_name_or_path or merge_lora")

    # 1. Model, processor and data, all BEFORE the Accelerator: under ZeRO-3 transformers would
    #    otherwise partition the model while loading, and PEFT's trainable tokens would gather
    #    rows through CUDA collectives (which fail on CPU).
    data_processor = load_data_processor(data_args.dataset_path)

    def build_model():  # again at the end under ZeRO-3 / FSDP: a whole copy to gather the shards into
        return prepare_model(model_args, lora_args, data_processor, args.gradient_checkpointing, args.mlp_chunk_size)

    model, processor = build_model()
    return_large_blocks_to_the_system(model)  # large models: freed activations leave the resident set
    base = model_args.model_name_or_path or f"{model.config.model_type} built from a config"
    with bad_input():  # their ValueErrors say what in the data or the model to fix
        train_data, eval_data = load_task_data(data_args, processor, seed=args.seed)
        check_compatibility(model, processor, train_data)

    # 2. Accelerator (gloo on CPU), loaders, optimizer.
    accelerator = make_accelerator(
        args.mixed_precision, args.gradient_accumulation_steps, out,
        log_with=None if args.report_to == "none" else args.report_to, seed=args.seed,
        max_grad_norm=args.max_grad_norm)
    collator = UnimodalCollator(processor, data_args.max_length, packing=data_args.packing,
                                loss_on=data_args.loss_on, cfg_dropout=data_args.cfg_dropout, seed=args.seed)
    train_loader = make_dataloader(train_data, collator, args.per_device_batch_size, seed=args.seed)
    eval_collator = UnimodalCollator(processor, data_args.max_length, loss_on=data_args.loss_on)
    eval_loaders = {task: make_dataloader(d, eval_collator, args.eval_batch_size, shuffle=False)
                    for task, d in eval_data.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.optimizer_in_backward:  # each parameter steps in backward; the step() below finds no gradients
        check_step_in_backward(accelerator.num_processes, accelerator.distributed_type, args.max_grad_norm,
                               args.gradient_accumulation_steps)
        step_in_backward(optimizer)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # FSDP2 swaps every parameter for a sharded DTensor in prepare: clip those, not the originals.
    trainable = [p for p in model.parameters() if p.requires_grad]
    eval_loaders = {task: accelerator.prepare(loader) for task, loader in eval_loaders.items()}

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps or math.ceil(args.num_epochs * steps_per_epoch)
    config = {f.name: getattr(a, f.name) for a in (model_args, data_args, lora_args, args)
              for f in dataclasses.fields(a)}
    # Checked before resuming: damaged files, another config or a process count it cannot continue.
    checkpoints = CheckpointManager(out / "checkpoints", keep_last=args.keep_last, config=config)
    state = checkpoints.load(accelerator) or {"step": 0, "micro_step": 0}
    step, start_micro_step = state["step"], continued_micro_step(state, accelerator)
    if accelerator.is_main_process:
        accelerator.print(f"{len(train_data)} samples in {len(train_loader.dataset)} rows "
                          f"(filling {1 - train_loader.dataset.plan.padding_fraction:.0%} of max_length "
                          f"{data_args.max_length}); {total_steps} steps"
                          + (f", resuming at step {step}" if step else ""))
    accelerator.init_trackers("finetune", config={k: v if isinstance(v, int | float | str | bool) else str(v)
                                                  for k, v in config.items()})

    # 3. Train. The LR is set from the step each time (no scheduler object): a prepared scheduler
    #    would step once per process per optimizer step, and nothing has to be checkpointed.
    sharded = weights_sharded(accelerator)  # ZeRO-3 / FSDP: no sampling from one process
    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_main_process, desc="fine-tuning")
    meter, metrics = Throughput(), {}
    with Preemption(args.preemption_grace_s) as preemption:  # SIGTERM / SIGUSR1: checkpoint, exit 75
        model.train()
        for micro_step, batch in infinite_batches(accelerator, train_loader, start_micro_step, len(train_loader)):
            if step >= total_steps:
                break
            lr = args.learning_rate * cosine_with_warmup(step, args.warmup_steps, total_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.accumulate(model):
                loss = batch_loss(model, batch, args.loss, args.loss_chunk_size)
                # One all-reduce for [loss, tokens, positions]: a NaN on any process stops them all
                # (none is left waiting in a collective), and tokens/s counts every process.
                ids = batch["input_ids"]  # [B, T]
                local = torch.stack([loss.detach().float(), (ids != processor.pad_token_id).sum().float(),
                                     torch.tensor(float(ids.numel()), device=ids.device)])
                sums = accelerator.reduce(local, reduction="sum")
                mean_loss = sums[0] / accelerator.num_processes
                check_finite(mean_loss, step, checkpoints)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            meter.tick(int(sums[1]), int(sums[2]))
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update()
            if step < total_steps and preemption.should_stop(accelerator):
                raise preemption.stop(accelerator, checkpoints, step, {"micro_step": micro_step + 1})
            if step % args.log_steps == 0 or step == total_steps:
                speed = meter.window_rate()
                progress.set_postfix(loss=f"{mean_loss.item():.3f}", tok_s=f"{speed:.0f}")
                accelerator.log({"train/loss": mean_loss.item(), "train/lr": lr, "train/tokens_per_s": speed},
                                step=step)
            if (args.eval_steps and step % args.eval_steps == 0) or step == total_steps:
                metrics = evaluate(accelerator, model, eval_loaders, args.loss, args.loss_chunk_size)
                accelerator.log(metrics, step=step)
                accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if args.sample_prompts and not sharded:
                    save_samples(accelerator, model, processor, args.sample_prompts, sampling, out, step,
                                 seed=args.seed, tensorboard=args.report_to == "tensorboard")
                meter.skip()
            if step % args.save_steps == 0 and step < total_steps:
                checkpoints.save(accelerator, step, {"micro_step": micro_step + 1})
                meter.skip()
        progress.close()
    if accelerator.is_main_process:
        meter.save(out / "train_stats.json", steps=step, num_processes=accelerator.num_processes)

    # 4. One folder: LM (merged or adapter) + processor + image tokenizer + model card.
    repo_id = (args.hub_model_id or out.name) if args.push_to_hub else None
    final = save_finetuned(
        accelerator, model, processor, out / "final", config=config,
        base=base,
        merge_lora=args.merge_lora, rebuild=lambda: build_model()[0], metrics=metrics, card_name=repo_id,
        sampling=sampling)
    if repo_id and accelerator.is_main_process:
        push_folder_to_hub(final, repo_id, private=args.hub_private)
    accelerator.end_training()
    return final


if __name__ == "__main__":
    from unimodal.cli import run_recipe

    run_recipe(main)
