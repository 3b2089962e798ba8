// Command imcloud-bench loads an imcloud server on this machine and
// measures it: fan-out to many clients, idle connections, the push API.
//
// It is its own command, not a mode of the server binary: the server need
// not link a load generator (and fasthttp, which only the push mode uses to
// keep the client's own cost below the server's), and a build of imcloud
// for production carries none of it. It signs client tokens with the
// shared stages/logic/token package, as the server verifies them.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "imcloud-bench:", err)
		}
		os.Exit(1)
	}
}

// run runs the load mode args name against a server on this machine.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var (
		api, apiKey, target, secret, route string
		cpuProfile, save                   string
		clients, rooms, rate, conc, pid    int
		behind, batch                      int
		grpcAddr                           string
		control, swarms, nodes             string
		midBase                            int64
		speed, users                       int
		wait                               time.Duration
		duration, drain, hold              time.Duration
		asJSON                             bool
	)
	fs := pflag.NewFlagSet("imcloud-bench", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	synopsis := `imcloud-bench fanout|connections|push|reconnect|swarm|cluster|ceiling [flags]: load a server on this machine.
  fanout       clients spread over rooms; room pushes at --rate; delivered/s, latency, lost, duplicated
  connections  --clients idle authenticated connections; connect rate, server memory per connection
  push         the HTTP push API at --concurrency; requests/s and latency
  reconnect    --clients that opted in to recovery, over --rooms, disconnect; --behind pushes to each
               room; all reconnect at once with their positions: time until all recovered, peak RSS
  swarm        --clients (mids from --mid-base) held on one cloud node for --hold, reporting what they
               receive to a cluster driver on --control (scripts/bench-cluster.sh starts several)
  cluster      drive --swarms: wait for every client, then a room push to all, a push/all at --speed,
               and --users push/mids at --rate; delivered, lost, latency, RSS per connection (--nodes)
  ceiling      serve a push API that does no work on --api (HTTP) and --grpc (PushStream) until
               interrupted: push against it measures what this machine allows any server`
	fs.Usage = func() { fmt.Fprintf(stderr, "%s\n\nFlags:\n%s", synopsis, fs.FlagUsages()) }
	fs.StringVar(&api, "api", "127.0.0.1:3111", "logic HTTP address")
	fs.StringVar(&apiKey, "api-key", "", "API key (logic.api_keys)")
	fs.StringVar(&target, "target", "ws://127.0.0.1:3102/sub", "client endpoint: ws://host:port/sub or host:port for TCP")
	fs.StringVar(&secret, "secret", "", "logic.auth.jwt_secret, to sign client tokens")
	fs.IntVar(&clients, "clients", 1000, "clients (fanout, connections, swarm); all the swarms hold (cluster)")
	fs.IntVar(&rooms, "rooms", 1, "rooms the clients are spread over (fanout)")
	fs.IntVar(&rate, "rate", 10, "room pushes per second (fanout)")
	fs.IntVar(&conc, "concurrency", 64, "concurrent requests (push)")
	fs.StringVar(&route, "route", "/im/push/room?operation=1000&type=live&room=bench", "push route and query (push)")
	fs.IntVar(&pid, "server-pid", 0, "server process, for memory per connection (connections) and peak memory (reconnect)")
	fs.StringVar(&grpcAddr, "grpc", "", "drive the gRPC push API's PushStream at this address (logic.api_grpc_addr), --concurrency streams, in place of HTTP (push)")
	fs.StringVar(&control, "control", "127.0.0.1:26300", "where a swarm answers its driver (swarm)")
	fs.Int64Var(&midBase, "mid-base", 1, "the first client's user id (swarm); the first swarm's (cluster)")
	fs.StringVar(&swarms, "swarms", "", "the swarms' control addresses, comma-separated (cluster)")
	fs.StringVar(&nodes, "nodes", "", "cloud processes as pid:rss-before:clients, comma-separated, for RSS per connection (cluster)")
	fs.IntVar(&speed, "speed", 5000, "push/all pacing, connections per second per node (cluster)")
	fs.IntVar(&users, "users", 10000, "distinct users pushed to by mid (cluster)")
	fs.DurationVar(&wait, "wait", 3*time.Minute, "how long to wait for the clients, and for each phase's deliveries (cluster)")
	fs.IntVar(&batch, "batch", 0, "pushes per request through POST /im/push/batch, in place of --route (push)")
	fs.IntVar(&behind, "behind", 50, "messages pushed to each room while the clients are away (reconnect)")
	fs.DurationVar(&duration, "duration", 10*time.Second, "how long to push (fanout, push)")
	fs.DurationVar(&drain, "drain", 5*time.Second, "how long to wait for deliveries after the last push (fanout); for every client to recover (reconnect)")
	fs.DurationVar(&hold, "hold", 2*time.Second, "how long to hold connections before measuring (connections); how long a swarm runs (swarm)")
	fs.BoolVar(&asJSON, "json", false, "print the result as JSON")
	fs.StringVar(&save, "save", "", "also write the result as JSON to this file")
	fs.StringVar(&cpuProfile, "cpuprofile", "", "write the load generator's own CPU profile to this file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("bench: want one of fanout, connections, push, reconnect, swarm, cluster, ceiling")
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if cpuProfile != "" {
		// The load generator shares the machine with the server: its own
		// profile shows what the measurement itself costs.
		f, err := os.Create(cpuProfile)
		if err != nil {
			return fmt.Errorf("bench: create CPU profile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("bench: start CPU profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	cc := clientConfig{Target: target, Secret: secret}
	var (
		result interface{ Print(io.Writer) }
		err    error
	)
	switch fs.Arg(0) {
	case "fanout":
		result, err = fanout(ctx, fanoutConfig{clientConfig: cc, API: api, APIKey: apiKey,
			Clients: clients, Rooms: rooms, Rate: rate, Duration: duration, Drain: drain}, stderr)
	case "connections":
		result, err = connections(ctx, connectionsConfig{clientConfig: cc, Clients: clients, ServerPID: pid, Hold: hold}, stderr)
	case "push":
		if grpcAddr != "" {
			result, err = grpcPush(ctx, pushConfig{APIKey: apiKey, Concurrency: conc, Duration: duration}, grpcAddr, stderr)
			break
		}
		result, err = push(ctx, pushConfig{API: api, APIKey: apiKey, Concurrency: conc, Duration: duration, Route: route, Batch: batch}, stderr)
	case "swarm":
		result, err = swarm(ctx, swarmConfig{clientConfig: cc, Clients: clients, MidBase: midBase, Control: control, Hold: hold}, stderr)
	case "cluster":
		var ns []clusterNode
		if ns, err = parseNodes(nodes); err == nil {
			result, err = cluster(ctx, clusterConfig{API: api, APIKey: apiKey, Swarms: splitList(swarms), Nodes: ns,
				Speed: speed, Users: users, Rate: rate, MidBase: midBase, Wait: wait, Clients: clients}, stderr)
		}
	case "ceiling":
		result, err = ceiling(ctx, api, grpcAddr, stderr)
	case "reconnect":
		result, err = reconnect(ctx, reconnectConfig{clientConfig: cc, API: api, APIKey: apiKey,
			Clients: clients, Rooms: rooms, Behind: behind, ServerPID: pid, Timeout: drain}, stderr)
	default:
		return fmt.Errorf("bench: unknown mode %q", fs.Arg(0))
	}
	if err != nil {
		return err
	}
	if save != "" {
		b, err := json.MarshalIndent(result, "", "  ")
		if err != nil {
			return fmt.Errorf("bench: encode result: %w", err)
		}
		if err := os.WriteFile(save, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("bench: save result: %w", err)
		}
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(result)
	}
	result.Print(stdout)
	return nil
}

// splitList splits a comma-separated flag, dropping empty entries.
func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// parseNodes reads --nodes: pid:rss-before:clients, comma-separated.
func parseNodes(s string) ([]clusterNode, error) {
	var out []clusterNode
	for _, f := range splitList(s) {
		parts := strings.Split(f, ":")
		if len(parts) != 3 {
			return nil, fmt.Errorf("--nodes %q: want pid:rss-before:clients", f)
		}
		var n clusterNode
		var err error
		if n.PID, err = strconv.Atoi(parts[0]); err == nil {
			if n.BaseRSS, err = strconv.ParseInt(parts[1], 10, 64); err == nil {
				n.Clients, err = strconv.Atoi(parts[2])
			}
		}
		if err != nil {
			return nil, fmt.Errorf("--nodes %q: %w", f, err)
		}
		out = append(out, n)
	}
	return out, nil
}
