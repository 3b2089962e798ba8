//go:build integration

package e2e

import (
	"bufio"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/stages/logic/token"
)

// proc is an imcloud process.
type proc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done is closed
}

// startProc runs bin with args and waits for its "imcloud started" log.
// The cluster secret goes in the environment, as the README asks: on the
// command line it would show in ps and /proc/<pid>/cmdline.
func startProc(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "IMCLOUD_LOG__LEVEL=info", "IMCLOUD_CLUSTER__SECRET="+testClusterSecret)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			if strings.Contains(line, "level=ERROR") || strings.Contains(line, "level=WARN") {
				t.Log("process:", line)
			}
			if strings.Contains(line, "imcloud started") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() { p.kill() })
	select {
	case <-ready:
	case <-p.done:
		t.Fatalf("%v exited before starting: %v", args, p.err)
	case <-time.After(wait):
		t.Fatalf("%v did not start within %s", args, wait)
	}
	return p
}

// kill sends SIGKILL unless the process already exited, and waits for it.
func (p *proc) kill() {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// stream pushes to keys from workers until stop is closed, and returns
// the bodies that got 200 and how many pushes were refused.
func stream(t *testing.T, h *harness, prefix string, stop <-chan struct{}, okCount *atomic.Int64, keys ...string) func() ([]string, int) {
	var (
		mu      sync.Mutex
		ok      []string
		refused int
		wg      sync.WaitGroup
		seq     atomic.Int64
	)
	for range 8 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				body := prefix + "-" + strconv.FormatInt(seq.Add(1), 10)
				code, _ := h.do(request{path: "/im/push/keys", query: map[string][]string{"operation": {"1000"}, "keys": keys}, body: body})
				mu.Lock()
				if code == 200 {
					ok = append(ok, body)
					okCount.Add(1)
				} else {
					refused++
				}
				mu.Unlock()
				if code != 200 {
					time.Sleep(20 * time.Millisecond) // a client backing off after a 503
				}
			}
		})
	}
	return func() ([]string, int) {
		wg.Wait()
		return ok, refused
	}
}

// repeats counts the arrivals beyond the first of each message.
func repeats(got map[string]int) int {
	n := 0
	for _, c := range got {
		n += c - 1
	}
	return n
}

// waitFor polls cond until it holds or wait passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestIntegrationJobKilledTwice: the job process is killed with SIGKILL
// twice during a stream of pushes; every accepted push is delivered.
func TestIntegrationJobKilledTwice(t *testing.T) {
	bin := buildBinary(t)
	topics := amqpTopics(t)
	front := start(t, append(topics, "stages=logic,cloud")...)
	c := front.connect("ws", token.Claims{Mid: 1, Key: "killed-job"})
	jobArgs := []string{"run", "--stages", "job", "--set", "job.cloud_addrs=" + front.addrs.CloudGRPC, "--set", "job.dedupe.store=redis"}
	for _, s := range topics {
		jobArgs = append(jobArgs, "--set", s)
	}
	job := startProc(t, bin, jobArgs...)

	var accepted atomic.Int64
	stop := make(chan struct{})
	done := stream(t, front, "kill", stop, &accepted, "killed-job")
	for round := 1; round <= 2; round++ {
		waitFor(t, "pushes to flow", func() bool { return accepted.Load() >= int64(round*500) })
		job.kill()
		job = startProc(t, bin, jobArgs...)
	}
	waitFor(t, "pushes after the second restart", func() bool { return accepted.Load() >= 1500 })
	close(stop)
	ok, refused := done()
	dups := repeats(collect(t, "client", c, ok))
	t.Logf("%d pushes accepted, %d refused, all delivered; %d delivered twice (at-least-once across a kill)", len(ok), refused, dups)
}

// TestIntegrationRabbitMQRestart: RabbitMQ restarts during a stream of
// pushes; every push that got 200 is delivered, and pushes are accepted
// again once it is back.
func TestIntegrationRabbitMQRestart(t *testing.T) {
	h := start(t, amqpTopics(t)...)
	c := h.connect("tcp", token.Claims{Mid: 1, Key: "restart"})
	var accepted atomic.Int64
	stop := make(chan struct{})
	done := stream(t, h, "restart", stop, &accepted, "restart")
	waitFor(t, "pushes to flow", func() bool { return accepted.Load() >= 300 })
	rabbitmqctl(t, "stop_app")
	// Whatever happens next, leave RabbitMQ running for the other tests.
	t.Cleanup(func() { _ = exec.Command("rabbitmqctl", "start_app").Run() })
	before := accepted.Load()
	rabbitmqctl(t, "start_app")
	waitFor(t, "pushes accepted after the restart", func() bool { return accepted.Load() >= before+300 })
	close(stop)
	ok, refused := done()
	dups := repeats(collect(t, "client", c, ok))
	t.Logf("%d pushes accepted (%d before the stop), %d refused with 503 while RabbitMQ was down, all delivered; %d twice", len(ok), before, refused, dups)
}

func rabbitmqctl(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("rabbitmqctl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("rabbitmqctl %v: %v\n%s", args, err, out)
	}
}
