package memory

import (
	"testing"
	"time"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestRegistryContract(t *testing.T) {
	registrytest.Run(t, func(_ *testing.T, sessionTTL, nodeTTL time.Duration) pipeline.Registry {
		return New(sessionTTL, nodeTTL)
	})
}
