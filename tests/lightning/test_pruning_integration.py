"""Fine-tuning a sketched model inside the user's own Optuna study, pruned by optuna-integration."""

from __future__ import annotations

import optuna
from lightning.pytorch import Trainer, seed_everything
from optuna_integration import PyTorchLightningPruningCallback

from sketchtune import SketchedModule
from sketchtune.nn import SKLinear

from .boring import Classifier, DataModule

PLAN = {"net.2": {"type": "SKLinear", "params": {"num_terms": 1, "low_rank": 8}, "seed": 0}}


def test_pytorch_lightning_pruning_callback_prunes_fine_tuning_of_a_sketched_model() -> None:
    seed_everything(0)

    def objective(trial: optuna.Trial) -> float:
        model = SketchedModule(Classifier(lr=trial.suggest_float("lr", 1e-4, 1e-1, log=True)), PLAN)
        assert isinstance(model.module.net[2], SKLinear)
        trainer = Trainer(
            max_epochs=3,
            limit_train_batches=4,
            limit_val_batches=2,
            num_sanity_val_steps=0,
            logger=False,
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[PyTorchLightningPruningCallback(trial, monitor="val_acc")],
        )
        trainer.fit(model, DataModule())
        return float(trainer.callback_metrics["val_acc"])

    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.ThresholdPruner(lower=0.5),
    )
    study.optimize(objective, n_trials=4)
    assert len(study.trials) == 4
    for trial in study.trials:
        assert trial.intermediate_values  # the sketched model reported every epoch
    states = {t.state for t in study.trials}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert optuna.trial.TrialState.PRUNED in states  # a too-small learning rate stays below 0.5
