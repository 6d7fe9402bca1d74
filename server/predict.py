"""The hosted Llama 2 endpoint's `predict` contract (the seed page), and /models."""
from __future__ import annotations

from flask import Blueprint, g, jsonify

from .app import ApiError, check_auth, current_runtime, envelope, json_body, wait_for
from .metrics import record_job
from .validation import Limits, parse_json, parse_predict

OK_MESSAGE = "Ran successfully"

bp = Blueprint("predict", __name__)


def _predict(model_id: str | None):
    check_auth()
    rt = current_runtime()
    g.rec.model = rt.info.model_id
    if model_id is not None and model_id != rt.info.model_id:
        raise ApiError(404, f"unknown model {model_id!r}: this server serves {rt.info.model_id!r} (POST /{rt.info.model_id}-webhook/predict)")
    body = json_body()
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
    check_auth()
    i = current_runtime().info
    return jsonify({"data": [{
        "id": i.model_id, "chat": i.chat, "backend": i.backend, "n_ctx": i.n_ctx,
        "n_parallel": i.n_parallel, "endpoint": f"/{i.model_id}-webhook/predict",
    }]})
