"""Scale-out on Ray: engine replicas as Ray Serve deployments behind the same HTTP server (`miaotui serve
--replicas N`), routed by prompt prefix. Needs the optional `ray[serve]` package (`pip install miaotui[cluster]`)."""
