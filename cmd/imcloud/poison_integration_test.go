//go:build integration

package main

import (
	"fmt"
	"strings"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/pipeline/config"
)

// TestIntegrationPoisonCommand drives `imcloud poison` against RabbitMQ on
// an empty poison queue of the test's own.
func TestIntegrationPoisonCommand(t *testing.T) {
	topic := fmt.Sprintf("imcloud.test.cli.%d", time.Now().UnixNano())
	sets := []string{"--set", "topics.poison=" + topic + ".poison", "--set", "topics.push=" + topic + ".push"}
	t.Cleanup(func() {
		conn, err := amqp091.Dial(config.Default().Broker.AMQP.URL)
		if err != nil {
			return
		}
		defer conn.Close()
		if ch, err := conn.Channel(); err == nil {
			_, _ = ch.QueueDelete(topic+".poison", false, false, false)
			_, _ = ch.QueueDelete(topic+".push", false, false, false)
		}
	})
	out, _, err := runCmd(t, nil, append([]string{"poison", "list"}, sets...)...)
	if err != nil || !strings.Contains(out, "0 poisoned message(s)") {
		t.Fatalf("list: %q %v", out, err)
	}
	out, _, err = runCmd(t, nil, append([]string{"poison", "replay", "--all"}, sets...)...)
	if err != nil || !strings.Contains(out, "replayed 0") {
		t.Fatalf("replay: %q %v", out, err)
	}
}
