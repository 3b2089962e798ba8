// Package pubsubtest runs Watermill's universal Pub/Sub suite the way every
// imcloud broker adapter is held to it: persistent, at least once, no
// ordering or consumer-group claims, on topics of its own.
package pubsubtest

import (
	"testing"

	"github.com/ThreeDotsLabs/watermill/pubsub/tests"
)

// Prefix starts every topic the suite creates, for cleaning up after it.
const Prefix = "imcloud.universal."

// Run runs the suite against the Pub/Subs newPubSub makes.
func Run(t *testing.T, newPubSub tests.PubSubConstructor) {
	features := tests.Features{
		ConsumerGroups:      false,
		ExactlyOnceDelivery: false,
		GuaranteedOrder:     false,
		Persistent:          true,
		GenerateTopicFunc:   func(tctx tests.TestContext) string { return Prefix + string(tctx.TestID) },
		// No RestartServiceCommand: the suite's TestReconnect appends to a
		// slice from one goroutine and reads it from another, which the race
		// detector fails. Reconnects are tested end to end instead, through
		// a broker restart: e2e TestIntegrationRabbitMQRestart.
	}
	tests.TestPubSub(t, features, newPubSub, nil)
}
