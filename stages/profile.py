"""DVC stage `profile`: every exit's measured cost in ms per image, at batch 1 and batch N, on
`evaluate.device` with `evaluate.threads`; calibrate budgets time against it.

The images are the held-out split's (the test split's when nothing is held out): timing reads
no labels, and the test split stays for evaluate."""

from pipeline import paths
from pipeline.data import load_split
from pipeline.devices import stage_device
from pipeline.entry import stage_main
from pipeline.evaluation import eval_source, exit_costs, load_model
from pipeline.io import check_writable, write_json
from pipeline.latency import sample
from pipeline.profiling import REGIMES, apply_threads, measure
from pipeline.stage_input import stage_input


@stage_main
def main() -> None:
    params = stage_input().params
    check_writable([paths.PROFILE_DIR])
    apply_threads(params.evaluate.threads)
    device = stage_device(params.evaluate.device)
    net = load_model(params, paths.MODEL, device)
    split = load_split(paths.PREPARED, "val")
    if not len(split):
        split = load_split(paths.PREPARED, "test")
    config = params.profile
    batched = sample(split, config.images or len(split), params.seed)
    single = sample(split, config.batch1_images, params.seed)
    profile = measure(
        net,
        eval_source(params, batched, params.evaluate.batch_size),
        eval_source(params, single, 1),
        device,
        exit_costs(net, params),
        config.repeats,
        config.warmup,
    )
    write_json(paths.EXIT_COSTS, profile.to_json())
    machine = profile.machine
    print(f"exit costs on {machine.device}, {machine.threads} thread(s), ms per image:")
    for regime in REGIMES:
        print(f"  {regime:8s} " + " ".join(f"{ms:.4f}" for ms in profile.ms[regime]))


if __name__ == "__main__":
    main()
