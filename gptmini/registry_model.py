"""The code of a registered gptmini model, logged as an MLflow "model from code".

MLflow executes this file when it loads the model (`mlflow.pyfunc.load_model("models:/gptmini@production")`),
so loading unpickles nothing: the weights are safetensors read by `gptmini.checkpoint.load_model`, and the
text comes from our own sampling code. The sequence length is not frozen into the model (as a traced or
exported graph would freeze it): any prompt up to the config's `max_seq_len` works.

Input: a list of prompts (or a DataFrame with one string column, e.g. `prompt`). Params: max_new_tokens, temperature,
top_k, top_p, seed. Output: the generated continuations, one string per prompt.
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

from gptmini.checkpoint import load_model
from gptmini.generate import generate_text


class GPTMiniModel(PythonModel):
    def load_context(self, context) -> None:
        self.model, self.tokenizer = load_model(context.artifacts["weights"])

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        if hasattr(model_input, "columns"):  # a DataFrame: its `prompt` column, else its only column
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = model_input[column].tolist()
        else:
            prompts = list(model_input)
        return [generate_text(self.model, self.tokenizer, str(p), **(params or {})) for p in prompts]


mlflow.models.set_model(GPTMiniModel())
