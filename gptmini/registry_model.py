"""The code of a registered gptmini model, logged as an MLflow "model from code".

MLflow executes this file when it loads the model (`mlflow.pyfunc.load_model("models:/gptmini@production")`),
so loading unpickles nothing: the weights are safetensors read by `gptmini.weights.load_model`, and the
text comes from our own sampling code. The sequence length is not frozen into the model (as a traced or
exported graph would freeze it): any prompt up to the config's `max_seq_len` works.

Input: a list of prompts, or a DataFrame whose first string column holds them (e.g. one `prompt` column). Params:
max_new_tokens, temperature, top_k, top_p, seed, quantize ("none" or "int8"). Output: the generated continuations,
one string per prompt. MLflow reads predict's type hints: it checks the input against `list[str]` (turning a
DataFrame into that list) before predict runs, and it derives the signature's input and output from them
(registry.save_pyfunc adds the params).

A version carries its full-precision weights only; `quantize` is applied when a predict first asks for it, and
the quantized copy is kept for later calls. Quantizing takes well under a second at our sizes and is a pure
function of the weights, so a second stored artifact would only be one more thing to keep in step with the
version, and the gate would still have evaluated the other one.
"""
from __future__ import annotations

import copy
from typing import Any

import mlflow
import torch
from mlflow.pyfunc import PythonModel

from gptmini import quantize
from gptmini.weights import load_model
from gptmini.generate import generate_text


class GPTMiniModel(PythonModel):
    def load_context(self, context) -> None:
        self.loaded, self.tokenizer = load_model(context.artifacts["weights"])
        self.models: dict[str, torch.nn.Module] = {}

    def model(self, mode: str) -> torch.nn.Module:
        mode = quantize.check_mode(mode)
        if mode not in self.models:
            # "none" prepares the loaded model itself; another mode works on a copy, so both can be served.
            self.models[mode] = quantize.apply(self.loaded if mode == "none" else copy.deepcopy(self.loaded), mode)
        return self.models[mode]

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        params = dict(params or {})
        model = self.model(params.pop("quantize", "none"))
        return [generate_text(model, self.tokenizer, prompt, **params) for prompt in model_input]


mlflow.models.set_model(GPTMiniModel())
