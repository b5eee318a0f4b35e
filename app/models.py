"""Model names: config names and their aliases (clients of the system we re-implement send
served names such as `gemma-3-4b-it`), resolved to one canonical name."""

from __future__ import annotations

from app.errors import UnknownModel
from app.settings import ModelSettings


class ModelRegistry:
    def __init__(self, models: dict[str, ModelSettings]) -> None:
        self.models = models
        self._by_label: dict[str, str] = {}
        for name, cfg in models.items():
            for label in [name, *cfg.aliases]:
                self._by_label[label] = name
            if cfg.served_name:
                self._by_label.setdefault(cfg.served_name, name)

    def resolve(self, label: str) -> str:
        try:
            return self._by_label[label]
        except KeyError:
            raise UnknownModel(label[:128], list(self.models)) from None

    def get(self, name: str) -> ModelSettings:
        return self.models[self.resolve(name)]
