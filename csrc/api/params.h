// refseg_params -> the pipeline's options, validated (ApiError naming the field).
#pragma once

#include "../pipeline/pipeline.h"
#include "refseg.h"

namespace refseg {

PromptOptions to_options(const refseg_prompt_params& p);
void check_grid(const refseg_prompt_params& p);
MatchOptions match_options(const refseg_params& p);
PipelineOptions options_of(const refseg_params& p);

}  // namespace refseg
