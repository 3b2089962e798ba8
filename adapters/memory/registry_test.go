package memory

import (
	"testing"
	"time"

	"imcloud/adapters/registrytest"
)

func TestRegistryContract(t *testing.T) {
	registrytest.Run(t, func(_ *testing.T, sessionTTL, nodeTTL time.Duration) registrytest.Registry {
		return New(sessionTTL, nodeTTL)
	})
}

// clock is a settable time source.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }
