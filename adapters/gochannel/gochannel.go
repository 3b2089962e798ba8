// Package gochannel is the embedded broker: Watermill's in-process Go
// channel Pub/Sub, for standalone runs and fast tests.
package gochannel

import (
	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"
)

// outputBuffer lets a burst of publishes queue without blocking the HTTP
// handler while job works through them.
const outputBuffer = 4096

// New returns an in-process Pub/Sub. Messages live only in this process:
// what is queued when it exits is gone, which is the embedded trade-off.
func New(logger watermill.LoggerAdapter) *gochannel.GoChannel {
	return gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: outputBuffer}, logger)
}
