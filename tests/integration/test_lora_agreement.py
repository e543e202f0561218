"""A rollout or trainer whose LoRA signature differs from the one the
scheduler published refuses to start, with the setting that disagrees."""

from __future__ import annotations

import pytest

from services.rollout.service import RolloutService
from services.trainer.service import TrainerService
from shared.config import ConfigError, RolloutConfig, SchedulerConfig, TrainerConfig
from shared.deployment import deployment_from_config, write_deployment_async


@pytest.mark.parametrize("service_class, config_class", [(RolloutService, RolloutConfig),
                                                         (TrainerService, TrainerConfig)])
async def test_a_service_with_another_lora_signature_refuses_to_start(service_class, config_class, redis_url,
                                                                      stream_prefix, async_redis, tmp_path):
    published = SchedulerConfig(redis_url=redis_url, stream_prefix=stream_prefix, lora_rank=8)
    await write_deployment_async(async_redis, stream_prefix, deployment_from_config(published))
    service = service_class(config_class(redis_url=redis_url, stream_prefix=stream_prefix, lora_rank=4,
                                         data_dir=str(tmp_path)))
    try:
        with pytest.raises(ConfigError, match="CLORA_LORA_RANK: scheduler has 8, .* has 4"):
            await service.setup()
    finally:
        await service.close()
