"""The hosted Llama 2 endpoint's `predict` contract (the seed page), and /models."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from .app import ApiError, acquire, check_auth, envelope, json_body, state, wait_for
from .metrics import record_job
from .validation import Limits, parse_json, parse_predict

OK_MESSAGE = "Ran successfully"

bp = Blueprint("predict", __name__)


def _predict(model_id: str | None):
    check_auth()
    if model_id is not None and model_id not in state().pool.entries:
        served = ", ".join(f"/{m}-webhook/predict" for m in state().pool.entries)
        raise ApiError(404, f"unknown model {model_id!r}: this server serves {served}")
    body = json_body()
    rt = acquire(model_id)
    prompt, params = parse_predict(parse_json(body), Limits(max_new_tokens=rt.info.n_ctx, max_sequences=rt.info.n_parallel))
    job = rt.submit(prompt, params)
    result = wait_for(job)
    record_job(g.rec, rt.info.model_id, job, len(job.tokens), result)
    return envelope(OK_MESSAGE, [{"generated_text": prompt + c.text} for c in result.completions])


@bp.post("/predict")
def predict():
    return _predict(None)


@bp.post("/<hook>/predict")
def predict_webhook(hook: str):
    if not hook.endswith("-webhook"):
        raise ApiError(404, f"no such endpoint /{hook}/predict; use /predict or /<model_id>-webhook/predict")
    return _predict(hook[: -len("-webhook")])


@bp.get("/models")
def models():
    """Every model, loaded or not: state, quant, file size, memory when loaded."""
    check_auth()
    return jsonify({"data": state().pool.describe()})
