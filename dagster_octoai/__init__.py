"""dagster-octoai: OctoAI-style image generation for Dagster."""

from .client import (
    AsyncOctoAIClient as AsyncOctoAIClient,
    OctoAIClient as OctoAIClient,
    RetryPolicy as RetryPolicy,
)
from .errors import *  # noqa: F403
from .models import (
    AsyncJob as AsyncJob,
)
from .models import (
    CallInfo as CallInfo,
)
from .models import (
    Engine as Engine,
)
from .models import (
    GeneratedImage as GeneratedImage,
)
from .models import (
    ImageGenerationRequest as ImageGenerationRequest,
)
from .models import (
    ImageGenerationResponse as ImageGenerationResponse,
)
from .models import (
    JobStatus as JobStatus,
)
from .models import (
    PollResult as PollResult,
)
from .models import (
    PromptTooLongWarning as PromptTooLongWarning,
)
from .models import (
    Sampler as Sampler,
)
from .version import __version__ as __version__
