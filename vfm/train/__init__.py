"""Fine-tuning pipeline: ``vfm train CONFIG.yaml`` on the Transformers Trainer.

* :mod:`vfm.train.config` - the YAML schema (:func:`load_config`).
* :mod:`vfm.train.trainer` - :class:`KnowledgeTrainer` (loss = knowledge cross-entropy with the
  teacher's top-k and the rules' allowed sets), collator, callbacks.
* :mod:`vfm.train.model` - student loading, PEFT (LoRA/AdaLoRA on vfm's ops) or top-layer tuning.
* :mod:`vfm.train.run` - the whole run: data preparation, rules, teacher, training, evaluation.
* :mod:`vfm.train.tagging` - ``task: tagging`` (BIO): word/first-subword alignment, per-token
  rule masks (gazetteers, token rules, transitions) and teacher, entity F1 with constrained Viterbi.
"""

from vfm.train.config import Config, config_from_dict, load_config

__all__ = ["Config", "load_config", "config_from_dict", "train"]


def __getattr__(name):
    if name == "train":
        from vfm.train.run import train

        return train
    raise AttributeError(name)
