"""pgws (Go) on pgws_sync: audiences, ``audience,{json}`` payloads, one listener per process."""
