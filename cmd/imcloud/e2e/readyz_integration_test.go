//go:build integration

package e2e

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/stages/logic/token"
)

// TestIntegrationReadyzWhenRabbitMQStops is issue 14's readiness bullet:
// with every stage on RabbitMQ, stopping RabbitMQ turns /readyz 503
// naming the broker and the canary within 10 s while the canary's age
// grows; started again, the process is ready again and no push accepted
// before, during or after is lost.
func TestIntegrationReadyzWhenRabbitMQStops(t *testing.T) {
	h := start(t, append(amqpTopics(t), "admin.addr=127.0.0.1:0", "job.canary_interval=500ms", "cloud.canary_timeout=1500ms")...)
	readyz := func() (int, string) {
		res, err := http.Get("http://" + h.addrs.Admin + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	canaryAge := func() float64 {
		return scrape(t, h.addrs.Admin)["imcloud_canary_age_seconds"]
	}
	waitFor(t, "ready with the canary flowing", func() bool {
		code, body := readyz()
		return code == 200 && strings.Contains(body, "canary: ok") && canaryAge() < 1
	})
	c := h.connect("tcp", token.Claims{Mid: 1, Key: "readyz"})
	var accepted atomic.Int64
	stop := make(chan struct{})
	done := stream(t, h, "readyz", stop, &accepted, "readyz")
	waitFor(t, "pushes to flow", func() bool { return accepted.Load() >= 200 })

	rabbitmqctl(t, "stop_app")
	t.Cleanup(func() { _ = exec.Command("rabbitmqctl", "start_app").Run() })
	stopped := time.Now()
	var body string
	for {
		var code int
		code, body = readyz()
		if code == http.StatusServiceUnavailable && strings.Contains(body, "canary: no job canary") && strings.Contains(body, "broker: the canary could not be published") {
			break
		}
		if time.Since(stopped) > 10*time.Second {
			t.Fatalf("10 s after RabbitMQ stopped, /readyz answers %d:\n%s", code, body)
		}
		time.Sleep(100 * time.Millisecond) // polling the probe, with a deadline
	}
	notReadyIn := time.Since(stopped)
	age1 := canaryAge()
	time.Sleep(time.Second) // the age must grow with time: one second of it
	if age2 := canaryAge(); age2 < age1+0.5 {
		t.Fatalf("canary age %v then %v a second later: not growing while RabbitMQ is down", age1, age2)
	}

	rabbitmqctl(t, "start_app")
	before := accepted.Load()
	waitFor(t, "ready again", func() bool { code, _ := readyz(); return code == 200 })
	waitFor(t, "pushes accepted after the restart", func() bool { return accepted.Load() >= before+200 })
	close(stop)
	ok, refused := done()
	dups := repeats(collect(t, "client", c, ok))
	t.Logf("not ready %s after RabbitMQ stopped:\n%s%d pushes accepted, %d refused while it was down, all delivered; %d twice",
		notReadyIn.Round(time.Millisecond), body, len(ok), refused, dups)
}
