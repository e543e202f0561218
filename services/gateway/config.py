"""The gateway's configuration (``clora gateway`` / ``python -m services.gateway``)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import BaseConfig, LoraConfig

DEFAULT_GATEWAY_PORT = 8900


@dataclass
class GatewayConfig(BaseConfig, LoraConfig):
    """``lora_rank`` (CLORA_LORA_RANK): the deployment's, the most a Tinker run may ask for."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = DEFAULT_GATEWAY_PORT
    gateway_api_keys_file: str = ""  # one key per line ("tml-..."; '#' comments)
    gateway_api_keys: str = ""  # comma-separated keys (env CLORA_GATEWAY_API_KEYS), added to the file's
    base_model: str = "clora-tiny"  # the name clients pass as base_model
    tokenizer_id: str = ""  # what get_info reports for the client's tokenizer (default: base_model)
    max_context_length: int = 2048
    max_body_bytes: int = 64 * 1024 * 1024
    max_num_samples: int = 64
    max_sample_tokens: int = 1024
    default_sample_tokens: int = 16
    op_timeout_s: float = 600.0  # an op the trainer/rollout does not answer in time fails
    poll_wait_s: float = 20.0  # retrieve_future waits this long for a pending future, then says try_again
    futures_keep_s: float = 3600.0  # finished futures are forgotten after this
    # Shares (env CLORA_GATEWAY_MAX_...): no key can take more than these.
    gateway_max_runs_per_key: int = 8  # training runs one key may hold (create_model, a run from state)
    gateway_max_checkpoints_per_run: int = 64  # sampler weights + states one run may save
    gateway_max_pending_ops_per_key: int = 16  # trainer ops + samples of one key in flight (beyond: 429, retried)
    gateway_max_datums_per_op: int = 256  # datums in one forward / forward_backward (the SDK chunks to it)
    gateway_max_tokens_per_op: int = 65536  # model_input tokens, summed over one op's datums
    gateway_retry_after_s: int = 1  # the Retry-After of a 429

    def validate(self) -> None:
        super().validate()
        self._require(0 <= self.gateway_port < 65536, "gateway_port", "a TCP port (0: any free one)")
        self._require(bool(self.base_model), "base_model", "non-empty")
        self._require_positive("max_context_length", "max_body_bytes", "max_num_samples",
                               "max_sample_tokens", "default_sample_tokens", "op_timeout_s", "poll_wait_s",
                               "futures_keep_s", "gateway_max_runs_per_key", "gateway_max_checkpoints_per_run",
                               "gateway_max_pending_ops_per_key", "gateway_max_datums_per_op",
                               "gateway_max_tokens_per_op", "gateway_retry_after_s")
