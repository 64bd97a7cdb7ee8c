# Sourced by the scripts: offline model hubs, Ray on loopback without auth.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export RAY_AUTH_MODE=disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
